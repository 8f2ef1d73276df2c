"""The accuracy study behind ``nbbn accuracy``: how accurate are batch statistics, normalized
outputs and gradients, in nbbn and in the batch norms people run?

* :mod:`.algorithms` -- the statistics algorithms a naive kernel would run (naive one-pass,
  two-pass, Welford, Chan) in the data's dtype, and the double-double references (statistics
  and gradients);
* :mod:`.peers`      -- PyTorch (CPU; CUDA on a GPU), Flax/XLA (fast and two-pass variance),
  NumPy and CuPy, each behind an optional import, called as people call them;
* :mod:`.rounding`   -- part (a): rounding error vs m, κ = |mean|/std and dtype: the study's
  algorithms, every nbbn backend and the peers;
* :mod:`.sampling`   -- part (b): sampling error of batch mean and variance vs theory;
* :mod:`.estimators` -- part (c): EMA / Algorithm 2 / biased population estimates and the
  train–inference gap;
* :mod:`.gradients`  -- part (e): rounding error of dx, dγ, dβ (nbbn backends, the emulated
  pre-fold nbbn backward, PyTorch autograd, Flax jax.vjp);
* :mod:`.across_ranks` -- part (d): statistics across processes (nbbn.distributed);
* :mod:`.parts`      -- the parts as the command sees them: one module each (a rounding,
  b sampling, c estimators, d distributed, e gradients), one interface (``run``, ``findings``,
  ``report``, ``plots``), in the ordered tuple ``PARTS``;
* :mod:`.common` (``RunContext``, populations, sizes), :mod:`.report` (tables, names, the
  findings' phrases) and :mod:`.figures` (plot helpers) -- shared by the parts;
* :mod:`.summary`    -- report.md: header, the practitioner's findings and table, the parts';
* :mod:`.cli`        -- the click command ``accuracy``.

The naive algorithm exists only here; nbbn's kernels never use it.
"""
