"""Test-session set-up.

CUDA kernels are tested under Numba's CUDA simulator unless NBBN_TEST_GPU=1 asks for the real
GPU. The simulator must be chosen before Numba is first imported, hence here, at the very top.
"""

import os

if os.environ.get("NBBN_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Hypothesis (tests/test_properties.py): derandomized -- a fixed seed per test -- and bounded.
# ``fast`` (the default) keeps the file inside the fast tier; NBBN_HYPOTHESIS_PROFILE=full runs
# ten times the examples (CI's full tier). The CUDA-simulator tests run a tenth of the count.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the `test` extra; test_properties.py then fails to import
    pass
else:
    _COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    settings.register_profile("fast", max_examples=100, **_COMMON)
    settings.register_profile("full", max_examples=1000, **_COMMON)
    settings.load_profile(os.environ.get("NBBN_HYPOTHESIS_PROFILE", "fast"))
