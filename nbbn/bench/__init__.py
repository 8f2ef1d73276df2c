"""The benchmark harness behind ``nbbn bench`` and ``nbbn compare``.

:func:`run` is the Python entry point (a DataFrame of tidy rows back; the click command only
parses options and calls it). Modules, in the order the data flows:

* :mod:`.baselines` -- PyTorch (:mod:`.torch_baseline`, imported on first use), NumPy and
  nbbn-unfused baselines, registered in the same registry as the kernels (kind "baseline"), so
  the runner never branches on a backend's name.
* :mod:`.sweep`     -- shapes that carry their layout, presets, named target sweeps, the axes
  (backend × variant × op × layout × fusion × call × cache × dtype × N × shape) and the plan:
  only valid configurations, grouped into points; every skip has its reason.
* :mod:`.cases`     -- the one case table: a point's inputs (awkward on purpose) and float64
  reference, cold/warm buffer sets, and each configuration's zero-argument calls and check.
* :mod:`.devices`   -- one timer per device (host ``perf_counter_ns``; CUDA events behind a
  blocking kernel), copies, last-level cache sizes.
* :mod:`.stats`     -- paired ratios, medians and their seeded bootstrap intervals.
* :mod:`.roofline`  -- the one bytes model.
* :mod:`.runner`    -- check, then time a point's calls round-robin, then tidy rows.
* :mod:`.report`    -- rows -> CSV, JSON, Markdown summary and plots; :mod:`.compare` -- two
  results -> faster / slower / same / ambiguous from their intervals.
* :mod:`.bench`     -- :func:`run`; :mod:`.commands` -- the click commands.
* :mod:`.targets`   -- issue #9's report (results/cpu-kernels.md) from a ``--sweep cpu-targets``
  run; :mod:`.readme` -- README's generated headline.

Writers, environment capture and the command echo shared with the accuracy study are in
:mod:`nbbn.output`. Importing this package registers the baselines (cheaply: torch is imported
on first use).
"""

from . import baselines  # noqa: F401  (registers the baseline backends)
from .run import HarnessError, RunRefused, run

__all__ = ["HarnessError", "RunRefused", "run"]
