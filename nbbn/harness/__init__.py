"""The benchmark harness behind ``nbbn bench`` and ``nbbn compare``.

Modules, in the order the data flows:

* :mod:`.baselines` -- NumPy and PyTorch baselines (:mod:`.torch_baseline`, imported on first
  use), registered in the same registry as the kernels (kind "baseline"), so the runner never
  branches on a backend's name.
* :mod:`.sweep`     -- the axes as data, shape presets, parsing, and the plan: every
  configuration either runs or is skipped with its reason.
* :mod:`.cases`     -- one configuration's inputs (awkward on purpose), float64 reference and
  preallocated outputs; returns a zero-argument callable to time.
* :mod:`.devices`   -- host and CUDA timers, copy bandwidth, device names (picked by
  ``BackendInfo.device``).
* :mod:`.roofline`  -- the bytes model of each op.
* :mod:`.env`       -- versions, threads and machine columns of every row.
* :mod:`.runner`    -- check, then time, then one tidy row per configuration.
* :mod:`.report`    -- rows -> CSV, JSON, Markdown summary and plots; :mod:`.compare` -- two
  result files -> faster / slower / same.
* :mod:`.commands`  -- the click commands ``bench`` and ``compare``.

Generic tidy-row I/O (append-only JSON-lines log, CSV/JSON, Markdown tables) is in
:mod:`nbbn.report`.

Importing this package registers the baselines (cheaply: torch is imported on first use).
"""

from . import baselines  # noqa: F401  (registers the baseline backends)
