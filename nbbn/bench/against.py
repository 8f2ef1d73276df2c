"""``nbbn bench --against [NAME=]PATH``: another checkout's CPU kernels as the backend
``cpu@NAME``, timed in the same rounds as ``cpu`` (A/B of two code versions in one run; compare
with ``nbbn compare RUN --pair cpu@NAME=cpu``).

How: PATH's ``nbbn/`` package is imported under a name of its own, ``_nbbn_against_<hash of
PATH>`` (:func:`importlib.util.spec_from_file_location` with ``submodule_search_locations``),
so its modules are a second copy beside ours: its relative imports (``from .. import registry``)
reach its own registry, spec and pool. Its ``cpu`` backend is loaded through its own registry,
whose load hook is first pointed at ``_nbbn_against_....cpu`` (the hook names the module
``nbbn.cpu`` absolutely and would import *ours*), and each of its ``cpu`` KernelSpecs is
registered in our registry under ``cpu@NAME`` (same op, layout, variant, dtypes, fusions).
When the copy's ``spec.py`` is byte for byte ours (the usual case: A/B of a kernel change), it
is imported as ours, so its kernels take our bundles as they are and a timed call is exactly
its kernel (:func:`_same_spec`). Otherwise each kernel is wrapped to convert our argument
bundle into the copy's classes field by field (:func:`convert`): duck typing is not safe,
since the kernels test ``geom.layout is Layout.NCHW`` against *their* enum; the converted
bundle is cached per bundle object, and the first call on each bundle pays the conversion
(~10 µs) -- the harness makes new bundles every trial, so on small points those first calls
are in the timed rounds and bias cpu@NAME slower: use a copy with our spec.py for timing. The
bench says so where it happens: a warning when such a copy is registered, and
:data:`BIAS_NOTE` in the notes of every row it times (round 11 timed 7ecd59e, whose spec.py
predates round 10's, in ``--call api`` at 1.3–2.6× the current code's time, unwarned).
With ``--call api`` the public call is ours (validation, allocation, output pool) over their
kernels.

Numba's on-disk cache is keyed by each kernel's source file, so the copy's kernels never
share entries with ours; but an entry names the module it was compiled in, so the copy's
kernels are cached in ``__pycache__/nbbn-against/`` beside their source (:func:`_own_cache`),
apart from the entries the copy makes when it is imported as ``nbbn`` itself. A fresh copy
compiles its kernels on first use (seconds per kernel, tens of seconds per kernel family).
An import of the copy that loads ``nbbn.*`` modules by absolute name (ours) is refused: its
kernels would not be its own.

The backend is registered only when asked for (``--against``), kind ``kernel`` (checked against
the reference with nbbn's tolerances, like ``cpu``); worker processes (``--isolate workers`` /
``process``) register it again from :func:`registered` before their first trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    _CacheLocator,
    _SourceFileBackedLocatorMixin,
)

from .. import registry, spec
from ..registry import BackendInfo, KernelSpec

PREFIX = "cpu@"
#: Why a copy whose spec.py is not ours times slower than its kernels are (see _same_spec):
#: carried by its wrapped kernels (``bias_note``) into every row's notes, and warned once.
BIAS_NOTE = ("the copy's nbbn/spec.py is not ours: each new argument bundle is converted to its "
             "classes (~10 us; with --call api every call), so its times are biased slower; "
             "time a checkout whose spec.py is ours")
#: The converted bundles kept per wrapper (the harness holds one per buffer set, ≤ 1024).
CACHE_SIZE = 2048
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: name -> resolved path of the copies registered in this process.
_REGISTERED: dict[str, str] = {}


class AgainstError(ValueError):
    """A bad --against; the message is one line."""


def parse(item: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (NAME = PATH's basename) -> (name, package folder)."""
    text = str(item).strip()
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    if not path:
        raise AgainstError(f"bad --against {item!r}: use PATH or NAME=PATH (PATH holds an "
                           "nbbn/ package, e.g. a git worktree of main)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise AgainstError(f"--against {item}: {path} is not a directory")
    p = p.resolve()
    if (p / "nbbn" / "__init__.py").is_file():
        pkg = p / "nbbn"
    elif p.name == "nbbn" and (p / "__init__.py").is_file() and (p / "registry.py").is_file():
        pkg, p = p, p.parent
    else:
        raise AgainstError(f"--against {item}: no nbbn package in {path} (expected "
                           f"{Path(path) / 'nbbn' / '__init__.py'})")
    name = name or p.name
    if not _NAME.match(name):
        raise AgainstError(f"--against {item}: backend name cpu@{name} is not a plain name "
                           "(letters, digits, . _ -): use NAME=PATH")
    return name, pkg


def module_name(pkg: Path) -> str:
    """The copy's package name: one per path (not per NAME), so that the module its cached
    kernels name (Numba pickles it into the cache, :func:`_own_cache`) is the same in every
    process and run that loads them."""
    return "_nbbn_against_" + hashlib.sha1(str(pkg).encode()).hexdigest()[:12]


def import_copy(pkg: Path):
    """PATH/nbbn imported as the package :func:`module_name` (once per process)."""
    modname = module_name(pkg)
    mod = sys.modules.get(modname)
    if mod is not None:
        return mod
    init = pkg / "__init__.py"
    spec_ = importlib.util.spec_from_file_location(modname, init,
                                                   submodule_search_locations=[str(pkg)])
    if spec_ is None or spec_.loader is None:
        raise AgainstError(f"--against {pkg.parent}: cannot import {init}")
    mod = importlib.util.module_from_spec(spec_)
    before = set(sys.modules)
    sys.modules[modname] = mod
    if _same_spec(pkg):  # its argument bundles are ours: no conversion per call (see _wrap)
        sys.modules[modname + ".spec"] = spec
    try:
        spec_.loader.exec_module(mod)
    except Exception as exc:
        for m in [m for m in sys.modules if m == modname or m.startswith(modname + ".")]:
            del sys.modules[m]
        raise AgainstError(f"--against {pkg.parent}: importing its nbbn failed: "
                           f"{type(exc).__name__}: {exc}") from None
    _check_no_leak(before, pkg)
    return mod


def _same_spec(pkg: Path) -> bool:
    """The copy's spec.py is byte for byte ours: then it is imported as ours, so its kernels
    take our bundles, enums and geometry as they are. Why: a converted bundle is cached per
    bundle object, and the bench makes new bundles every trial, so with conversion the first
    timed call on each buffer set paid it (~10 µs: an A/A run measured cpu@copy up to 1.9x
    slower than cpu on the smallest points, results/reliability/README.md), and the cache kept
    every trial's buffers alive until a worker ran out of memory."""
    try:
        return (pkg / "spec.py").read_bytes() == Path(spec.__file__).read_bytes()
    except OSError:
        return False


def _check_no_leak(before: set, pkg: Path) -> None:
    leaked = sorted(m for m in set(sys.modules) - before
                    if m == "nbbn" or m.startswith("nbbn."))
    if leaked:
        raise AgainstError(f"--against {pkg.parent}: its package imports {', '.join(leaked)} "
                           "by absolute name (ours, not its own): its kernels would not be "
                           "its own")


def convert(value, theirs):
    """Our bundle (or Geometry, enum, tuple) as the copy's classes (``theirs``: its ``spec``
    module), field by field; arrays and numbers pass as they are. ValueError when the copy's
    class lacks a field we set, or needs one we do not have."""
    if isinstance(value, enum.Enum):
        return getattr(theirs, type(value).__name__)(value.value)
    if isinstance(value, spec.Geometry):
        cls = theirs.Geometry
        fields = {f: convert(getattr(value, f), theirs) for f in value._fields
                  if f in cls._fields}
        missing = [f for f in cls._fields if f not in fields
                   and f not in cls._field_defaults]
        if missing:
            raise ValueError(f"the copy's Geometry needs {', '.join(missing)}, which ours lacks")
        return cls(**fields)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = getattr(theirs, type(value).__name__)
        theirs_fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.name in theirs_fields:
                kwargs[f.name] = convert(v, theirs)
            elif v is not None and v is not False and v != f.default:
                raise ValueError(f"the copy's {cls.__name__} has no field {f.name!r} "
                                 f"(set to {v!r} here)")
        return cls(**kwargs)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(convert(v, theirs) for v in value)
    return value


def _wrap(fn: Callable, theirs) -> Callable:
    """``fn`` (the copy's kernel) called on our bundle converted to its classes; the converted
    bundle is cached per bundle object (identity-checked; the cache holds the bundle, so its id
    is not reused while cached)."""
    cache: dict[int, tuple] = {}

    def call(args):
        hit = cache.get(id(args))
        if hit is None or hit[0] is not args:
            if len(cache) >= CACHE_SIZE:
                cache.clear()
            hit = cache[id(args)] = (args, convert(args, theirs))
        return fn(hit[1])

    call.__wrapped__ = fn
    call.bias_note = BIAS_NOTE  # read by the bench into each row's notes
    return call


class _Locator(_SourceFileBackedLocatorMixin, _CacheLocator):
    """Numba's cache of the copy's kernels: ``__pycache__/nbbn-against/`` beside their source
    (else a folder under the temp dir), never the ``__pycache__`` that the copy, imported as
    ``nbbn``, uses itself."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(os.path.dirname(os.path.abspath(py_file)),
                                        "__pycache__", "nbbn-against")

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        if not os.path.exists(py_file):
            return None
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError:
            self._cache_path = os.path.join(tempfile.gettempdir(), "nbbn-against",
                                            cls.get_suitable_cache_subpath(py_file))
            try:
                self.ensure_cache_path()
            except OSError:
                return None
        return self


class _Impl(CompileResultCacheImpl):
    _locator_classes = [_Locator]


class _Cache(FunctionCache):
    _impl_class = _Impl


@contextlib.contextmanager
def _own_cache():
    """Every ``cache=True`` dispatcher made inside caches with :class:`_Locator`. Why: Numba
    keys a cache entry by source file, function and signature, not by module, and pickles the
    module's name into it; the copy's kernels cached under ``_nbbn_against_...`` in the
    copy's own ``__pycache__`` would be loaded by the copy imported as ``nbbn`` (its own tests,
    its users) and fail to import that name."""
    from numba.core.dispatcher import Dispatcher

    def enable_caching(self):
        self._cache = _Cache(self.py_func)

    before = Dispatcher.enable_caching
    Dispatcher.enable_caching = enable_caching
    try:
        yield
    finally:
        Dispatcher.enable_caching = before


def _load(name: str, pkg: Path) -> Callable[[], None]:
    def load() -> None:
        theirs_reg = importlib.import_module(module_name(pkg) + ".registry")
        theirs_spec = importlib.import_module(module_name(pkg) + ".spec")
        before = set(sys.modules)
        try:
            with _own_cache():  # its kernels' dispatchers are made as its cpu imports
                specs = theirs_reg.kernels("cpu")  # its load hook: its own cpu (see register)
        except Exception as exc:
            raise AgainstError(f"--against {pkg.parent}: loading its cpu backend failed: "
                               f"{type(exc).__name__}: {exc}") from None
        _check_no_leak(before, pkg)
        if not specs:
            raise AgainstError(f"--against {pkg.parent}: its cpu backend registered no kernel")
        backend = PREFIX + name
        for s in specs:
            registry.register(KernelSpec(
                backend, spec.Op(s.op.value), spec.Layout(s.layout.value),
                s.fn if theirs_spec is spec else _wrap(s.fn, theirs_spec),
                f"{pkg.parent}: {s.description}",
                variant=s.variant, dtypes=getattr(s, "dtypes", spec.FLOAT_DTYPES),
                fusions=frozenset(spec.Fusion(f.value)
                                  for f in getattr(s, "fusions", (spec.Fusion.NONE,))),
                # its bound call where it has one and shares our spec (a checkout from before
                # nbbn.bind is timed by its plain call, as its users would call it)
                bind=getattr(s, "bind", None) if theirs_spec is spec else None))

    return load


def register(item: str) -> str:
    """Register ``cpu@NAME`` for ``[NAME=]PATH`` (importing PATH's nbbn package, not yet its
    kernels); its backend name. Registering the same name and path again is a no-op."""
    name, pkg = parse(item)
    backend = PREFIX + name
    where = str(pkg)
    if name in _REGISTERED:
        if _REGISTERED[name] != where:
            raise AgainstError(f"--against {item}: {backend} already names {_REGISTERED[name]}")
        return backend
    if backend in registry.backend_names():
        raise AgainstError(f"--against {item}: backend {backend} is already registered")
    mod = import_copy(pkg)
    if not _same_spec(pkg):
        warnings.warn(f"{backend} ({pkg.parent}): {BIAS_NOTE}", stacklevel=2)
    try:
        theirs_reg = importlib.import_module(mod.__name__ + ".registry")
        info = theirs_reg.backend_info("cpu")
        # Its hook imports "nbbn.cpu" by absolute name (ours): point it at its own.
        theirs_reg.register_backend(dataclasses.replace(
            info, load=lambda m=mod.__name__ + ".cpu": importlib.import_module(m)))
    except Exception as exc:
        raise AgainstError(f"--against {item}: its registry has no cpu backend "
                           f"({type(exc).__name__}: {exc})") from None
    registry.register_backend(BackendInfo(
        name=backend, description=f"cpu kernels of another checkout, {pkg.parent} (--against)",
        availability=lambda: None, load=_load(name, pkg), kind="kernel", device="cpu",
        default_variant=info.default_variant,
        dtypes=tuple(getattr(info, "dtypes", spec.FLOAT_DTYPES))))
    _REGISTERED[name] = where
    return backend


def registered() -> tuple[str, ...]:
    """``NAME=PATH`` of every copy registered here (for worker processes to register again)."""
    return tuple(f"{n}={Path(p).parent}" for n, p in _REGISTERED.items())


def register_all(items) -> tuple[str, ...]:
    """:func:`register` each item; their backend names."""
    return tuple(register(i) for i in items)


def unregister(backend: str) -> None:
    """Forget ``cpu@NAME`` (tests): our registry's entry; the imported copy stays loaded."""
    registry.unregister_backend(backend)
    _REGISTERED.pop(backend[len(PREFIX):], None)
