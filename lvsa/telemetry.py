"""Telemetry: every decision is an :class:`Event` delivered to the ``lvsa_event`` hook.

The default sink (:class:`lvsa.sink.DefaultSink`, registered like any plugin) prints the
``[LVSA]``, ``[LVSA-FALLBACK]``, ``[LVSA-MEM]`` and ``[LVSA-TIME]`` lines of DESIGN.md §3;
it alone decides what is a repeated line (:data:`lvsa.sink.PRINT_ONCE`):

* a fallback line once per distinct ``(origin, reason, seq_len)``;
  ``LVSA_WARN_FALLBACK=0`` silences only those;
* ``engaged`` and the schedule lines once per generation (:func:`new_generation`).

:data:`SESSION` counts sparse calls, dense-by-design calls and fallbacks by reason
for the whole process (``lvsa.session_summary()``).
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Dict, Optional

from . import plugins
from .events import Event  # noqa: F401 (re-export)
from .sink import DefaultSink  # noqa: F401 (re-export)


class Counts:
    """Attention calls by mode and backend, and fallbacks by reason (thread-safe).

    :data:`SESSION` is the process's record; each :class:`~lvsa.engine.Engine` keeps one
    per generation. Both are fed by the same two functions, :func:`count_call` and
    :func:`fallback`, so a call or a fallback is counted once, in one place.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with getattr(self, "_lock", threading.Lock()):
            self.sparse_calls = 0
            self.dense_by_design_calls = 0
            self.fallback_calls = 0
            self.fallbacks_by_reason: Counter = Counter()
            self.backend_calls: Counter = Counter()
            self.generation = 0

    def add_call(self, mode: str, backend: str = "") -> None:
        with self._lock:
            if mode == "sparse":
                self.sparse_calls += 1
                self.backend_calls[backend or "?"] += 1
            elif mode == "dense":
                self.dense_by_design_calls += 1

    def add_fallback(self, reason: str) -> None:
        with self._lock:
            self.fallback_calls += 1
            self.fallbacks_by_reason[reason or "?"] += 1

    def as_dict(self) -> Dict[str, Any]:
        return {
            "sparse_calls": self.sparse_calls,
            "dense_by_design_calls": self.dense_by_design_calls,
            "fallbacks": self.fallback_calls,
            "fallbacks_by_reason": dict(self.fallbacks_by_reason),
            "backend_calls": dict(self.backend_calls),
        }

    def line(self) -> str:
        s = (f"engaged: {self.sparse_calls} sparse calls, {self.dense_by_design_calls} dense-by-design "
             f"calls, {self.fallback_calls} fallbacks")
        if self.fallbacks_by_reason:
            s += " (" + ", ".join(f"{k}={v}" for k, v in sorted(self.fallbacks_by_reason.items())) + ")"
        if self.backend_calls:
            s += " backends: " + ", ".join(f"{k}={v}" for k, v in sorted(self.backend_calls.items()))
        return s


#: the old name of :class:`Counts`
SessionSummary = Counts

SESSION = Counts()


def emit(kind: str, **fields) -> Event:
    """Deliver an event to every ``lvsa_event`` hook implementation (counts nothing:
    calls and fallbacks are counted by :func:`count_call` and :func:`fallback`)."""
    ev = Event(kind, fields)
    plugins.deliver(ev)
    return ev


def count_call(mode: str, backend: str = "", record: Optional[Counts] = None) -> None:
    """Count one attention call (``sparse`` or ``dense``) in the session and, when given,
    in ``record`` (a generation's :class:`Counts`).

    Per-call counting stays off the plugin hook: it is on the hot path (every layer,
    every step). Sinks see the per-generation ``engaged`` event and the summary instead.
    """
    SESSION.add_call(mode, backend)
    if record is not None:
        record.add_call(mode, backend)


def fallback(origin: str, reason: str, seq_len: int, record: Optional[Counts] = None,
             warn: bool = True, **detail) -> Event:
    """The one fallback path: count a non-sparse call (session and ``record``) and emit its
    ``fallback`` event (the sink prints one line per ``(origin, reason, seq_len)``)."""
    SESSION.add_fallback(reason)
    if record is not None:
        record.add_fallback(reason)
    return emit("fallback", origin=origin, reason=reason, seq_len=seq_len, **detail, warn=warn)


def new_generation():
    """Start a new generation: ``engaged`` and schedule lines print again."""
    SESSION.generation += 1
    emit("generation_start", generation=SESSION.generation)


def session_summary() -> Dict[str, Any]:
    return SESSION.as_dict()


def reset_session():
    SESSION.reset()


def find_sink(cls=DefaultSink) -> Optional[Any]:
    for p in plugins.plugin_manager().get_plugins():
        if isinstance(p, cls):
            return p
    return None
