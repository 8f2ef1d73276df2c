"""The parts of ``nbbn accuracy``, in report order. Each is one module here with one interface:

* ``LETTER`` (its key in ``--parts`` and its place in the report), ``NAME`` (the other key, and
  the progress bar's label), ``TITLE`` (its section's heading: ``## (LETTER) TITLE``);
* ``run(ctx)`` computes, saves its tidy tables with ``ctx.save(name, df)`` and its skips with
  ``ctx.skip(rows)`` (each row: part, item, reason); ``ctx`` is a
  :class:`nbbn.accuracy.common.RunContext`, the command's options;
* ``findings(tables) -> list[str]``: its key findings, one Markdown paragraph each, read off the
  saved tables only (``tables``: every table the command saved, by name);
* ``report(tables) -> list[str]``: the Markdown lines of its section of ``report.md`` below the
  heading, or none (no section) when its tables are missing;
* ``plots(tables, out: Path) -> list[Path]``: the PNG figures it drew into ``out`` (called only
  once the command found matplotlib usable).

A part module imports only what formatting needs (pandas, NumPy, :mod:`.report`,
:mod:`.figures`) at module level; its computation (:mod:`nbbn.accuracy.rounding`, ...: Numba,
the peers' torch and jax) is imported inside ``run`` and the functions that need it, so
``nbbn -h`` and ``nbbn accuracy -h`` load none of it. Adding a part: one module here and one entry
in :data:`PARTS`.
"""

from __future__ import annotations

from . import distributed, estimators, gradients, rounding, sampling

#: every part, in report order (by letter)
PARTS = (rounding, sampling, estimators, distributed, gradients)


def choices() -> str:
    return ", ".join(f"{p.LETTER}/{p.NAME}" for p in PARTS)
