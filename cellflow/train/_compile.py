"""Compiled training programs shared between fits of the same configuration.

Every fit builds its training chunk as a new closure, so :func:`jax.jit`'s own cache (keyed on
the function object) never sees the same function twice and XLA compiles the chunk again:
about 8-12 s on two CPU cores for the default flow-matching model, against well under a second
to run a short fit's steps. Fitting the same configuration again (another seed, another
training subset of the same sizes, a resumed run, a refit in a notebook) then pays the whole
compilation again.

:func:`shared_jit` keys compiled executables on what XLA compiles, not on the Python function:
the fingerprint of the lowered StableHLO program (which holds every constant the closure bakes
in, so two programs that differ in anything compile separately), the devices it runs on and
the JAX version. Tracing and lowering still run for every new closure (a few seconds for the
default model); the compilation runs once per process.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax

__all__ = ["clear_compiled_programs", "shared_jit"]

#: Executables kept, least recently used dropped first. A default flow-matching chunk holds a
#: few MB of machine code; the data and parameters are arguments, never part of the program.
MAX_PROGRAMS = 32

_programs: OrderedDict[str, jax.stages.Compiled] = OrderedDict()
_lock = threading.Lock()


def clear_compiled_programs() -> None:
    """Forget every shared compiled program (the next fit of each configuration compiles again)."""
    with _lock:
        _programs.clear()


def _devices_of(leaves: list[Any]) -> tuple[int, ...]:
    ids = set()
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            ids.update(d.id for d in sharding.device_set)
    return tuple(sorted(ids))


def _fingerprint(lowered: jax.stages.Lowered, devices: tuple[int, ...], context: Hashable) -> str:
    digest = hashlib.sha256()
    digest.update(lowered.as_text(debug_info=False).encode())
    digest.update(repr((jax.__version__, jax.default_backend(), devices, context)).encode())
    return digest.hexdigest()


def shared_jit(fn: Callable[..., Any], *, context: Hashable = None) -> Callable[..., Any]:
    """:func:`jax.jit` whose compiled executables are shared with every other program of
    identical StableHLO, devices and ``context``.

    Parameters
    ----------
    fn
        Function of PyTrees of arrays, as for :func:`jax.jit` (no static arguments).
    context
        Anything hashable that the program's compilation depends on but its text does not show,
        e.g. the ids of a mesh's devices.

    Returns
    -------
    A callable with ``fn``'s signature. Its first call with given argument shapes, dtypes and
    shardings traces and lowers ``fn``, then reuses a compiled executable of the same program if
    this process has one (else compiles it); later calls with the same signature dispatch the
    executable directly.
    """
    jitted = jax.jit(fn)
    own: dict[Hashable, jax.stages.Compiled] = {}

    def call(*args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        signature = (treedef, tuple(
            (getattr(x, "shape", ()), getattr(x, "dtype", type(x)), getattr(x, "weak_type", False), getattr(x, "sharding", None))
            for x in leaves
        ))
        compiled = own.get(signature)
        if compiled is None:
            lowered = jitted.lower(*args)
            key = _fingerprint(lowered, _devices_of(leaves), context)
            with _lock:
                compiled = _programs.get(key)
                if compiled is not None:
                    _programs.move_to_end(key)
            if compiled is None:
                compiled = lowered.compile()
                with _lock:
                    _programs[key] = compiled
                    while len(_programs) > MAX_PROGRAMS:
                        _programs.popitem(last=False)
            own[signature] = compiled
        return compiled(*args)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call
