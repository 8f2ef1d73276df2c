"""Test-session set-up.

CUDA kernels are tested under Numba's CUDA simulator unless NBBN_TEST_GPU=1 asks for the real
GPU. The simulator must be chosen before Numba is first imported, hence here, at the very top.
"""

import os

if os.environ.get("NBBN_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
