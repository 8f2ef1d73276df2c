"""The ``"cpu"`` backend: Numba kernels (:mod:`.kernels`, compute only) and the backend module
(:mod:`.backend`: convert, allocate, choose the variant, register). Importing this package
registers the backend's kernels; ``nbbn`` does so on first use."""

from .backend import batch_stats, precompile  # noqa: F401  (registers the kernels)
