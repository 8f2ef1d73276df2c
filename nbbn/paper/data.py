"""The experiment's data: scikit-learn's handwritten digits (default) or MNIST-format IDX files.

Every data set comes back as a :class:`Dataset` of float images flattened to rows, scaled to
[0, 1], and int64 labels, split into train / validation / test. The splits are fixed (they do not
depend on the experiment's seed): the validation rows, used to choose the baseline's learning
rate, are carved from the training rows with a fixed permutation; the test rows are the data
set's own (IDX ``t10k-*`` files) or, for the digits, a fixed 500-image permutation subset.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: IDX type codes (the third magic byte) -> big-endian NumPy dtype.
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Seed of the fixed train/validation/test permutations (independent of ``--seed``).
SPLIT_SEED = 20150211


class DataError(ValueError):
    """A data set that cannot be read; the message names the file and what is wrong."""


@dataclass
class Dataset:
    name: str
    source: str  # where the data came from, for the report
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int = 10

    @property
    def features(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        return (f"{self.name}: {self.features} features, {self.classes} classes; "
                f"{len(self.y_train)} train / {len(self.y_val)} validation / "
                f"{len(self.y_test)} test rows; {self.source}")

    def astype(self, dtype) -> Dataset:
        dt = np.dtype(dtype)
        return Dataset(self.name, self.source, self.x_train.astype(dt), self.y_train,
                       self.x_val.astype(dt), self.y_val, self.x_test.astype(dt), self.y_test,
                       self.classes)


# ------------------------------------------------------------------------------------ IDX


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip-compressed or plain, recognized by its first bytes) as a NumPy array.

    Format (LeCun's MNIST page): two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions d, then d
    big-endian uint32 sizes, then the values, big-endian, row-major. Multi-byte types come back
    in native byte order.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (the magic number must start with two zero "
                        "bytes)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X}")
    if ndim == 0:
        raise DataError(f"{path}: IDX file with 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: {len(raw) - header} bytes of data, expected {expected} for "
                        f"shape {shape} of {dtype.name}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress`` or the name ends in
    .gz). The inverse of :func:`read_idx`; used by the tests to make small files."""
    path = Path(path)
    a = np.asarray(array)
    code = next((c for c, dt in IDX_DTYPES.items()
                 if (dt.kind, dt.itemsize) == (a.dtype.kind, a.dtype.itemsize)), None)
    if code is None or a.ndim == 0 or a.ndim > 255:
        raise ValueError(f"cannot write a {a.dtype} array of {a.ndim} dimensions as IDX")
    body = a.astype(IDX_DTYPES[code]).tobytes()
    raw = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes() + body
    if compress or (compress is None and path.suffix == ".gz"):
        raw = gzip.compress(raw, mtime=0)
    path.write_bytes(raw)
    return path


def _find(folder: Path, prefix: str, kind: str, ndim: int) -> Path:
    """``{prefix}-{kind}-idx{ndim}-ubyte`` (or with ``.`` before ``idx``), plain or ``.gz``."""
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for name in names:
        for suffix in ("", ".gz"):
            p = folder / (name + suffix)
            if p.is_file():
                return p
    raise DataError(f"{folder}: no {names[0]}[.gz] (nor {names[1]}[.gz]); --data needs the four "
                    "MNIST-format files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gzip or plain)")


def _images(path: Path) -> np.ndarray:
    """Rows of pixels as float64: ubyte images / 255, other types as stored."""
    a = read_idx(path)
    if a.ndim < 2:
        raise DataError(f"{path}: images must have at least 2 dimensions, got shape {a.shape}")
    scale = 255.0 if a.dtype == np.uint8 else 1.0
    rows = a.reshape(len(a), -1).astype(np.float64) / scale
    _check_finite(rows, str(path))
    return rows


def _labels(path: Path, n: int) -> np.ndarray:
    a = read_idx(path)
    if a.ndim != 1 or len(a) != n:
        raise DataError(f"{path}: labels must be 1-D with {n} entries (one per image), got "
                        f"shape {a.shape}")
    return _check_labels(a, str(path))


#: The experiment's classes: the digits 0–9 (MNIST, Fashion-MNIST, scikit-learn's digits).
CLASSES = 10


def _check_finite(rows: np.ndarray, where: str) -> None:
    """DataError naming the first image with a NaN or infinite pixel (a NaN would make every
    table NaN, with no word)."""
    bad = ~np.isfinite(rows)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(f"{where}: {int(bad.sum())} pixel values are not finite (the first, "
                        f"{rows[i, j]}, in image {i} at pixel {j}); pixels must be numbers")


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """The labels as int64, or DataError naming the first one that is not a digit 0–9 (a label
    of 200 would silently build a 201-class network)."""
    a = np.asarray(labels)
    ok = np.isfinite(a) if a.dtype.kind == "f" else np.ones(a.shape, bool)
    ok &= (a >= 0) & (a < CLASSES)
    if a.dtype.kind == "f":
        ok &= a == np.floor(np.where(ok, a, 0))
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{where}: labels must be digits 0–{CLASSES - 1}, got {a[i].item()} at "
                        f"entry {i} ({int((~ok).sum())} of {a.size} entries outside)")
    return a.astype(np.int64)


def check(ds: Dataset, batch: int) -> None:
    """DataError unless the experiment can run on ``ds`` with mini-batches of ``batch`` rows:
    at least one mini-batch of training rows, finite pixels, labels 0–9 (checked before any
    training starts: by ``nbbn paper`` and by :func:`nbbn.paper.experiment.run_all`)."""
    n = len(ds.y_train)
    if n < batch:
        raise DataError(f"{ds.name}: {n} training rows (after {len(ds.y_val)} validation rows "
                        f"are set aside) are fewer than one mini-batch of {batch}; the data "
                        f"set needs at least {batch + len(ds.y_val)} training images")
    for split in ("train", "val", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        _check_finite(np.asarray(x).reshape(len(x), -1), f"{ds.name} {split} rows")
        _check_labels(y, f"{ds.name} {split} labels")


def _split_val(x: np.ndarray, y: np.ndarray, n_val: int):
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def load_idx_dir(folder: str | os.PathLike, name: str | None = None,
                 val_fraction: float = 1 / 12) -> Dataset:
    """MNIST-format files in ``folder``: pixels / 255 (ubyte images), flattened; the last
    ``val_fraction`` of a fixed permutation of the training rows is the validation set (5,000 of
    MNIST's 60,000)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data {str(folder)!r} is not a folder")
    paths = {(p, k): _find(folder, p, k, 3 if k == "images" else 1)
             for p in ("train", "t10k") for k in ("images", "labels")}
    xtr = _images(paths["train", "images"])
    ytr = _labels(paths["train", "labels"], len(xtr))
    xte = _images(paths["t10k", "images"])
    yte = _labels(paths["t10k", "labels"], len(xte))
    if xtr.shape[1] != xte.shape[1]:
        raise DataError(f"{folder}: train images have {xtr.shape[1]} pixels, test images "
                        f"{xte.shape[1]}")
    classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    n_val = max(1, int(round(len(ytr) * val_fraction)))
    if len(ytr) - n_val < 2:
        raise DataError(f"{folder}: {len(ytr)} training images are too few to split")
    xtr, ytr, xva, yva = _split_val(xtr, ytr, n_val)
    label = name or folder.name
    files = ", ".join(sorted(p.name for p in paths.values()))
    return Dataset(label, f"IDX files in {folder} ({files})", xtr, ytr, xva, yva, xte, yte,
                   classes)


# ------------------------------------------------------------------------------------ digits

DIGITS_TEST, DIGITS_VAL = 500, 300


def load_digits() -> Dataset:
    """scikit-learn's handwritten digits (1,797 8×8 images, values 0–16, shipped with
    scikit-learn): pixels / 16; a fixed permutation gives 500 test, 300 validation and 997
    training images."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise DataError("the default data set is scikit-learn's digits: pip install "
                        "'nbbn[paper]' (or scikit-learn), or pass --data DIR with MNIST-format "
                        "IDX files") from None
    d = _load()
    x = np.asarray(d.data, dtype=np.float64) / 16.0
    y = np.asarray(d.target, dtype=np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    te, va, tr = (perm[:DIGITS_TEST], perm[DIGITS_TEST:DIGITS_TEST + DIGITS_VAL],
                  perm[DIGITS_TEST + DIGITS_VAL:])
    return Dataset("digits", "scikit-learn load_digits (1,797 8x8 images, pixels/16), fixed "
                   f"permutation split (seed {SPLIT_SEED})", x[tr], y[tr], x[va], y[va], x[te],
                   y[te], 10)


def load(data: str | os.PathLike | None) -> Dataset:
    """``None``: the digits; otherwise a folder of IDX files."""
    return load_digits() if data is None else load_idx_dir(data)
