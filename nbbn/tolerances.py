"""Named, dtype-aware tolerances, shared by the tests and the harness's correctness gate.

The error measure is the relative norm error of one output against the float64 reference,

    rel_err(out, ref) = ‖out − ref‖₂ / max(‖ref‖₂, scale, tiny),

taken over the whole output (all channels at once), and an output passes when
``rel_err <= TOLERANCE[(output, dtype)]``. NaN in ``out`` where ``ref`` is finite never passes.

``scale`` is the size of the terms an output is formed from, for outputs that can cancel to ~0:
dx = γ·invstd·(dy − dβ/m − x̂·dγ/m) is exactly 0 when m = 2, so its error is measured against
‖γ·invstd·dy‖ (:func:`nbbn.reference.dx_scale`) as well as ‖dx‖.

The float32 bounds are the issue's acceptance figures: forward outputs (and the batch variance)
within 1e-5, backward outputs within 1e-4. float64 kernels accumulate in float64, so their bounds
are set from the rounding they cannot avoid on awkward data: a float64 mean carries an error of
about ε·|μ|, i.e. ε·κ in units of σ with κ = |μ|/σ; the tests use κ up to 4e4, so forward outputs
get 1e-10 as backward does (folded inference loses log2 κ bits the same way).
"""

from __future__ import annotations

import numpy as np

from .spec import OP_OUTPUTS, Op

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)

#: (output name, dtype) -> bound on rel_err. Outputs of the three ops, plus "var" (batch variance).
TOLERANCE: dict[tuple[str, np.dtype], float] = {}
for _name in ("y", "save_mean", "save_invstd", "var"):
    TOLERANCE[(_name, _F32)] = 1e-5
    TOLERANCE[(_name, _F64)] = 1e-10
for _name in ("dx", "dgamma", "dbeta"):
    TOLERANCE[(_name, _F32)] = 1e-4
    TOLERANCE[(_name, _F64)] = 1e-10
#: Running statistics are updated by a few float ops per channel in their own dtype.
for _name in ("running_mean", "running_var"):
    TOLERANCE[(_name, _F32)] = 1e-6
    TOLERANCE[(_name, _F64)] = 1e-13


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


#: Half-precision storage (float16, bfloat16; keyed by x's dtype). Derived from the unit roundoff
#: u of the storage format -- u = 2^-11 for float16 (11-bit significand), 2^-8 for bfloat16 (8-bit)
#: -- not from observed errors:
#:
#: * y, dx: every element is computed in float32 (or better) from exactly representable half
#:   inputs and rounded once to the half format, an error of at most u·|value|; the float32
#:   arithmetic before it adds a few float32 roundings (2^-24 each, relative to the terms, which
#:   dx's error scale ‖γ·invstd·dy‖ bounds), 2^13 times smaller for float16. So rel_err ≤ u plus
#:   a negligible term: the bound is 2u, the second u a margin for that term and for float16
#:   subnormals (|y| < 6.1e-5 is rounded to an absolute 6e-8, not a relative u), never for tuning.
#: * Per-channel outputs (save_mean, save_invstd, dgamma, dbeta, and the batch variance) are
#:   float32 numbers (:func:`nbbn.validate.channel_dtype`) computed from float64 sums of the exact
#:   half inputs, the same path as for float32 x, so they keep float32's bounds; running
#:   statistics are updated in their own dtype as for float32 x.
#: * dz = dy·[y > 0] is a copy of dy's half value or 0: exact.
UNIT_ROUNDOFF = {np.dtype(np.float16): 2.0**-11}
if (_BF16 := _bfloat16()) is not None:
    UNIT_ROUNDOFF[_BF16] = 2.0**-8
for _dt, _u in UNIT_ROUNDOFF.items():
    for _name in ("y", "dx"):
        TOLERANCE[(_name, _dt)] = 2 * _u
    for _name in ("save_mean", "save_invstd", "var", "dgamma", "dbeta", "running_mean",
                  "running_var"):
        TOLERANCE[(_name, _dt)] = TOLERANCE[(_name, _F32)]
    TOLERANCE[("dz", _dt)] = 0.0


def tolerance(output: str, dtype) -> float:
    return TOLERANCE[(output, np.dtype(dtype))]


def rel_err(out, ref, scale: float = 0.0) -> float:
    """‖out − ref‖₂ / max(‖ref‖₂, scale) in float64 (inf if out has NaN/Inf where ref is
    finite)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {out.shape} vs {ref.shape}")
    bad = ~np.isfinite(out) & np.isfinite(ref)
    if bad.any():
        return float("inf")
    diff = np.where(np.isfinite(ref), out - ref, 0.0)
    denom = np.linalg.norm(np.where(np.isfinite(ref), ref, 0.0))
    return float(np.linalg.norm(diff) / max(denom, scale, np.finfo(np.float64).tiny))


def check_outputs(op: Op, outputs, references, scales=None) -> dict[str, float]:
    """rel_err of each output of ``op`` (name -> error); ``scales`` maps output names to their
    term scale (see the module docstring). Compare the result with :func:`passed`."""
    names = OP_OUTPUTS[Op(op)]
    scales = scales or {}
    return {n: rel_err(o, r, scales.get(n, 0.0))
            for n, o, r in zip(names, outputs, references, strict=True)}


def passed(errors: dict[str, float], dtype) -> bool:
    return all(e <= tolerance(n, dtype) for n, e in errors.items())
