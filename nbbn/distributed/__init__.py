"""Synchronized batch norm over MPI (:mod:`.sync`), the header its calls exchange (:mod:`.wire`),
starting ranks (:mod:`.launch`) and what it costs (:mod:`.cost`, ``nbbn distributed bench``).

Import order has no cycle: ``wire`` ← ``sync`` ← ``cost``; ``launch`` stands alone.
"""

from .launch import mpiexec_command, rank_environment
from .sync import batch_norm_backward, batch_norm_train, merge_stats

__all__ = ["batch_norm_backward", "batch_norm_train", "merge_stats", "mpiexec_command",
           "rank_environment"]
