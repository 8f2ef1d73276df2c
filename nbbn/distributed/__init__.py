"""Synchronized batch norm over MPI (:mod:`.sync`), the header and the one collective its calls
make (:mod:`.wire`), the exact tree-independent rows that collective reduces (:mod:`.exact`),
starting ranks (:mod:`.launch`) and what it costs (:mod:`.cost`, ``nbbn distributed bench``;
:mod:`.costmodel`, ``nbbn distributed costmodel``).

Import order has no cycle: ``exact`` ← ``wire`` ← ``sync`` ← ``cost``; ``costmodel`` ← ``cost``
(which adds its command); ``launch`` stands alone.
"""

from .launch import mpiexec_command, rank_environment
from .sync import batch_norm_backward, batch_norm_train, merge_stats

__all__ = ["batch_norm_backward", "batch_norm_train", "merge_stats", "mpiexec_command",
           "rank_environment"]
