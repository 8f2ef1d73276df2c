"""The accuracy study behind ``nbbn accuracy``: how accurate are batch-estimated statistics?

* :mod:`.algorithms` -- the statistics algorithms a naive kernel would run (naive one-pass,
  two-pass, Welford, Chan) in the data's dtype, and the double-double reference;
* :mod:`.rounding`   -- part (a): rounding error vs m, κ = |mean|/std and dtype, nbbn backends
  included through ``registry.stats_function``;
* :mod:`.sampling`   -- part (b): sampling error of batch mean and variance vs theory;
* :mod:`.estimators` -- part (c): EMA / Algorithm 2 / biased population estimates and the
  train–inference gap;
* :mod:`.report`, :mod:`.summary` -- tables, figures and the Markdown report;
* :mod:`.commands`   -- the click command ``accuracy``.

The naive algorithm exists only here; nbbn's kernels never use it.
"""
