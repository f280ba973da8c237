"""Compiled training programs shared between fits of the same configuration, in this process
and (through an on-disk cache) across processes.

Every fit builds its training chunk as a new closure, so :func:`jax.jit`'s own cache (keyed on
the function object) never sees the same function twice and XLA compiles the chunk again:
about 8-12 s on two CPU cores for the default flow-matching model, against well under a second
to run a short fit's steps. Fitting the same configuration again (another seed, another
training subset of the same sizes, a resumed run, a refit in a notebook, the same script run
again, a notebook after a kernel restart) then pays the whole compilation again.

:func:`shared_jit` keys compiled executables on what XLA compiles, not on the Python function:
the fingerprint of the lowered StableHLO program (which holds every constant the closure bakes
in, so two programs that differ in anything compile separately), the shapes and dtypes of its
arguments and results (JAX leaves unread arguments out of the program's text), the devices it
runs on and the JAX version. Tracing and lowering still run for every new closure (a few seconds for the
default model); the compilation runs once per process, and once per machine while the program
stays in the on-disk cache (loading it back takes about 0.5 s).

The on-disk cache lives in ``$CELLFLOW_COMPILATION_CACHE`` if that is set (``off`` disables
it), else in ``$XDG_CACHE_HOME/cellflow/xla`` (``~/.cache/cellflow/xla``); see
:func:`set_compilation_cache`. Its entries are also keyed on the host's CPU model and
features, the jaxlib version and ``XLA_FLAGS``, so a cache shared between machines (a network
home directory) never hands one machine code compiled for another. It holds at most
:data:`MAX_CACHE_BYTES`, least recently used programs dropped first. An entry that cannot be
read back is deleted and compiled again; a cache that cannot be written is skipped with one
warning. When JAX's own persistent compilation cache is on (``jax_compilation_cache_dir``), it
already keeps every program between processes, and this cache stays out of its way: on a CPU, an
executable that JAX loaded from its cache does not survive being serialized again.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
import pickle
import platform
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import jax

from cellflow._errors import user_stacklevel

__all__ = ["clear_compiled_programs", "compilation_cache_dir", "set_compilation_cache", "shared_jit"]

#: Executables kept in memory, least recently used dropped first. A default flow-matching chunk
#: holds a few MB of machine code; the data and parameters are arguments, never part of the
#: program.
MAX_PROGRAMS = 32

#: Size bound of the on-disk cache (about 300 default flow-matching programs).
MAX_CACHE_BYTES = 1 << 30

#: Environment variable naming the on-disk cache's folder; one of ``_OFF`` disables it.
CACHE_ENV = "CELLFLOW_COMPILATION_CACHE"
_OFF = frozenset({"", "0", "off", "false", "no", "none"})
_SUFFIX = ".xla"
# Bumped whenever the layout of a cache entry changes, so old entries are never misread.
_FORMAT = 1

_programs: OrderedDict[str, jax.stages.Compiled] = OrderedDict()
_lock = threading.Lock()


class _Signatures:
    """One shared_jit function's executables by call signature, weakly listed so that
    :func:`clear_compiled_programs` can reach every live function's table."""

    __slots__ = ("executables", "__weakref__")

    def __init__(self) -> None:
        self.executables: dict[Hashable, jax.stages.Compiled] = {}


_tables: weakref.WeakSet[_Signatures] = weakref.WeakSet()
_UNSET: Any = object()
_cache_dir: Path | None = _UNSET
_warned_unwritable = False


def _cache_dir_from_environment() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cellflow" / "xla"


def compilation_cache_dir() -> Path | None:
    """Folder of the on-disk cache of compiled programs, or ``None`` when it is disabled."""
    return _cache_dir_from_environment() if _cache_dir is _UNSET else _cache_dir


def _jax_cache_is_on() -> bool:
    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def set_compilation_cache(path: str | os.PathLike | None) -> None:
    """Choose where compiled training programs are kept between processes.

    Parameters
    ----------
    path
        A folder (created on first write), or ``None`` to compile in every new process. This
        overrides ``$CELLFLOW_COMPILATION_CACHE`` for the rest of the process. While JAX's own
        persistent cache is on (``jax_compilation_cache_dir``), that cache keeps the programs
        instead and this folder is not used.

    Examples
    --------
    >>> import cellflow as cf
    >>> cf.train.set_compilation_cache("/scratch/me/cellflow-xla")  # doctest: +SKIP
    """
    global _cache_dir
    _cache_dir = None if path is None else Path(path).expanduser()


def clear_compiled_programs(*, on_disk: bool = False) -> None:
    """Forget the compiled programs this process holds (training and prediction).

    Parameters
    ----------
    on_disk
        Also delete the on-disk cache's programs. Without it, the next fit of a configuration
        loads its program from disk if it is there, else compiles it.
    """
    with _lock:
        _programs.clear()
        for table in list(_tables):
            table.executables.clear()
    folder = compilation_cache_dir() if on_disk else None
    if folder is not None and folder.is_dir():
        for entry in folder.glob("*" + _SUFFIX):
            entry.unlink(missing_ok=True)


def _devices_of(leaves: list[Any]) -> tuple[int, ...]:
    ids = set()
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            ids.update(d.id for d in sharding.device_set)
    return tuple(sorted(ids))


@functools.cache
def _host() -> str:
    """What the machine code depends on beyond the program: XLA compiles for this CPU's features."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        cpu = "".join(dict.fromkeys(lines))  # the first of each distinct line, in order
    except OSError:
        pass
    import jaxlib

    backend = jax.devices()[0].client
    kinds = sorted({d.device_kind for d in jax.devices()})
    return repr((platform.machine(), platform.processor(), cpu, jaxlib.__version__, backend.platform_version, kinds,
                 os.environ.get("XLA_FLAGS", ""), _FORMAT))


def _interface(tree: Any) -> str:
    """Each leaf's place, shape and dtype, as text that is the same in every process."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return repr([
        (jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype), bool(getattr(leaf, "weak_type", False)))
        for path, leaf in leaves
    ])


def _fingerprint(lowered: jax.stages.Lowered, devices: tuple[int, ...], context: Hashable) -> str:
    digest = hashlib.sha256()
    digest.update(lowered.as_text(debug_info=False).encode())
    # JAX drops the arguments a program never reads, so their shapes are not in its text (an
    # optimiser's init reads only the parameters' total size); a compiled program still expects
    # the arguments it was lowered with.
    digest.update(_interface(lowered.in_avals).encode())
    digest.update(_interface(lowered.out_info).encode())
    digest.update(repr((jax.__version__, jax.default_backend(), devices, context)).encode())
    return digest.hexdigest()


def _entry(folder: Path, key: str) -> Path:
    """The file of program ``key`` in ``folder``; the name adds the host the code was built for."""
    return folder / (hashlib.sha256((key + _host()).encode()).hexdigest() + _SUFFIX)


def _load(path: Path) -> jax.stages.Compiled | None:
    from jax.experimental import serialize_executable

    try:
        payload = path.read_bytes()
    except OSError:
        return None
    try:
        serialized, in_tree, out_tree, device_ids = pickle.loads(payload)
        by_id = {d.id: d for d in jax.devices()}
        # the program's own devices, in its order: by default all devices would be assumed
        devices = [by_id[i] for i in device_ids]
        compiled = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree, execution_devices=devices)
    except Exception:  # noqa: BLE001 - a damaged or foreign entry is recompiled, never fatal
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)  # least recently used is pruned first
    except OSError:
        pass
    return compiled


def _store(path: Path, compiled: jax.stages.Compiled) -> None:
    global _warned_unwritable
    from jax.experimental import serialize_executable

    try:
        device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
        entry = (*serialize_executable.serialize(compiled), device_ids)
        payload = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - some programs (or backends) cannot be serialized: keep them in memory only
        return
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # written whole, then renamed: a reader never sees half an entry
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(payload)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _prune(folder)
    except OSError as error:
        if not _warned_unwritable:
            _warned_unwritable = True
            warnings.warn(
                f"cellflow cannot write its compilation cache in {str(folder)!r} ({error}); every new process will "
                f"compile its training programs again. Choose another folder with "
                f"cellflow.train.set_compilation_cache(path) or ${CACHE_ENV}, or disable it with {CACHE_ENV}=off.",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )


def _prune(folder: Path) -> None:
    entries = []
    for path in folder.glob("*" + _SUFFIX):
        try:
            status = path.stat()
        except OSError:
            continue
        entries.append((status.st_mtime, status.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= MAX_CACHE_BYTES:
            break
        path.unlink(missing_ok=True)
        total -= size


@contextlib.contextmanager
def _garbage_collection_paused():
    """Hold Python's cycle collector off while JAX traces and lowers a program.

    Tracing a training step allocates hundreds of thousands of small objects, so the collector
    runs its generational passes over and over during it, finding little to free: a third of the
    default flow-matching step's lowering time. Whatever cycles tracing leaves are collected
    after, as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def shared_jit(fn: Callable[..., Any], *, context: Hashable = None, static_argnums: Sequence[int] = ()) -> Callable[..., Any]:
    """:func:`jax.jit` whose compiled executables are shared with every other program of
    identical StableHLO, devices and ``context``, in this process and through the on-disk cache.

    Parameters
    ----------
    fn
        Function of PyTrees of arrays, as for :func:`jax.jit`, called with positional arguments.
    context
        Anything hashable that the program's compilation depends on but its text does not show,
        e.g. the ids of a mesh's devices.
    static_argnums
        Positions of hashable arguments that are compile-time constants, as for :func:`jax.jit`.

    Returns
    -------
    A callable with ``fn``'s signature. Its first call with given static arguments and argument
    shapes, dtypes and shardings traces and lowers ``fn``, then reuses a compiled executable of
    the same program if this process has one, else loads it from the on-disk cache, else
    compiles it (and writes it there); later calls with the same signature dispatch the
    executable directly.
    """
    static = tuple(sorted(set(static_argnums)))
    jitted = jax.jit(fn, static_argnums=static)
    own = _Signatures()
    with _lock:
        _tables.add(own)

    def call(*args: Any) -> Any:
        dynamic = tuple(a for i, a in enumerate(args) if i not in static)
        leaves, treedef = jax.tree.flatten(dynamic)
        signature = (tuple(args[i] for i in static), treedef, tuple(
            (getattr(x, "shape", ()), getattr(x, "dtype", type(x)), getattr(x, "weak_type", False), getattr(x, "sharding", None))
            for x in leaves
        ))
        compiled = own.executables.get(signature)
        if compiled is None:
            with _garbage_collection_paused():
                lowered = jitted.lower(*args)
            key = _fingerprint(lowered, _devices_of(leaves), context)
            with _lock:
                compiled = _programs.get(key)
                if compiled is not None:
                    _programs.move_to_end(key)
            if compiled is None:
                folder = None if _jax_cache_is_on() else compilation_cache_dir()
                entry = None if folder is None else _entry(folder, key)
                compiled = None if entry is None else _load(entry)
                if compiled is None:
                    compiled = lowered.compile()
                    if entry is not None:
                        _store(entry, compiled)
                with _lock:
                    _programs[key] = compiled
                    while len(_programs) > MAX_PROGRAMS:
                        _programs.popitem(last=False)
            own.executables[signature] = compiled
        # A compiled program takes the dynamic arguments only (the static ones are in its code),
        # structured as when it was compiled: its own check flattens with JAX's tracing registry,
        # which takes some equal structures for different ones (deep-copied nnx Variables).
        args_, kwargs_ = compiled.in_tree.unflatten(leaves)
        return compiled(*args_, **kwargs_)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call
