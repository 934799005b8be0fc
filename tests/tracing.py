"""Counting JAX traces with the public `jax.monitoring` events (no private jit-cache sizes).

Every trace of a Python function for jit (or of an eager op's first use of a shape) records a
'/jax/core/compile/jaxpr_trace_duration' event; a cached call records none.
"""
from __future__ import annotations

import contextlib
import threading

import jax

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_events: list[int] = []  # thread ids of the traces seen while a counter is active
_active = [0]
_registered = [False]


def _listen(name: str, duration: float, **kwargs) -> None:
    if _active[0] and name == _TRACE:
        _events.append(threading.get_ident())


@contextlib.contextmanager
def count_traces():
    """Yields a list that holds, once the block ends, one entry per trace made on this thread."""
    if not _registered[0]:
        jax.monitoring.register_event_duration_secs_listener(_listen)
        _registered[0] = True
    start, me, found = len(_events), threading.get_ident(), []
    _active[0] += 1
    try:
        yield found
    finally:
        _active[0] -= 1
        found.extend(t for t in _events[start:] if t == me)
