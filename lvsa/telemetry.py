"""Telemetry: every decision is an :class:`Event` delivered to the ``lvsa_event`` hook.

The default sink (:class:`DefaultSink`, registered like any plugin) prints the
``[LVSA]``, ``[LVSA-FALLBACK]``, ``[LVSA-MEM]`` and ``[LVSA-TIME]`` lines of DESIGN.md §3:

* a fallback line once per distinct ``(origin, reason, seq_len)``;
  ``LVSA_WARN_FALLBACK=0`` silences only those;
* ``engaged`` and the schedule lines once per generation (:func:`new_generation`).

:data:`SESSION` counts sparse calls, dense-by-design calls and fallbacks by reason
for the whole process (``lvsa.session_summary()``).
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class Event:
    kind: str
    fields: Dict[str, Any]
    time: float = field(default_factory=time.time)

    def __getitem__(self, key):
        return self.fields[key]

    def get(self, key, default=None):
        return self.fields.get(key, default)


class SessionSummary:
    """Process-wide counters (thread-safe)."""

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

    def count(self, event: Event):
        with self._lock:
            if event.kind == "call":
                mode = event.fields.get("mode")
                if mode == "sparse":
                    self.sparse_calls += 1
                    self.backend_calls[event.fields.get("backend", "?")] += 1
                elif mode == "dense":
                    self.dense_by_design_calls += 1
            elif event.kind == "fallback":
                self.fallback_calls += 1
                self.fallbacks_by_reason[event.fields.get("reason", "?")] += 1

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


SESSION = SessionSummary()


def emit(kind: str, **fields) -> Event:
    """Deliver an event to every ``lvsa_event`` hook implementation."""
    ev = Event(kind, fields)
    SESSION.count(ev)
    from .plugins import plugin_manager

    plugin_manager().hook.lvsa_event(event=ev)
    return ev


def count_call(mode: str, backend: str = "") -> None:
    """Count one attention call (``sparse`` or ``dense``) in the session summary.

    Per-call counting stays off the plugin hook: it is on the hot path (every layer,
    every step). Sinks see the per-generation ``engaged`` event and the summary instead.
    """
    SESSION.count(Event("call", {"mode": mode, "backend": backend}))


def new_generation():
    """Start a new generation: ``engaged`` and schedule lines print again."""
    SESSION.generation += 1
    emit("generation_start", generation=SESSION.generation)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}GB"


class DefaultSink:
    """Prints the documented log lines (to stderr by default)."""

    def __init__(self, stream=None):
        self._stream = stream
        self._seen_fallbacks = set()
        self._lock = threading.Lock()

    @property
    def stream(self):
        return self._stream or sys.stderr

    def _print(self, line: str):
        print(line, file=self.stream, flush=True)

    # the hook
    from .hookspecs import hookimpl as _hookimpl  # noqa: E402

    @_hookimpl
    def lvsa_event(self, event: Event):
        f = event.fields
        k = event.kind
        if k == "schedule":  # the engine emits it once per generation and geometry
            self._print(f"[LVSA] reference_latent_frames={f['reference']} target_latent_frames={f['T']} "
                        f"extension_ratio={f['extension_ratio']:.2f}x")
            if f.get("auto"):
                self._print(f"[LVSA] computed key_frame_interval={f['kfi']} (latent frames)")
            self._print(f"[LVSA] kfi={f['kfi']} global_count={f['global_count']} "
                        f"attended_per_frame={f['attended_max']}/{f['T']}")
        elif k == "engaged":  # the engine emits it once per generation
            mode = "DENSE (T_lat <= ref)" if f["dense"] else "SPARSE"
            self._print(f"[LVSA] engaged ({f['origin']}): T_lat={f['T']} P={f['P']} seq_len={f['seq_len']} "
                        f"kfi={f['kfi']} W={f['W']} |G|={f['global_count']} -> {mode}")
        elif k == "fallback":
            if not f.get("warn", True):
                return
            key = (f.get("origin"), f.get("reason"), f.get("seq_len"))
            with self._lock:
                if key in self._seen_fallbacks:
                    return
                self._seen_fallbacks.add(key)
            skip = ("origin", "reason", "seq_len", "to", "warn")
            extra = " ".join(f"{a}={b}" for a, b in f.items() if a not in skip)
            extra = (" " + extra.replace(", ", ",")) if extra else ""
            target = "the REFERENCE backend" if f.get("to") == "reference" else "DENSE attention"
            self._print(f"[LVSA-FALLBACK] origin={f.get('origin')} reason={f.get('reason')} "
                        f"seq_len={f.get('seq_len')}{extra} -- falling back to {target} "
                        "(set LVSA_WARN_FALLBACK=0 to silence)")
        elif k == "selection":
            key = ("selection", f["backend"], f["device"])
            with self._lock:
                if key in self._seen_fallbacks:
                    return
                self._seen_fallbacks.add(key)
            refused = "; ".join(f"{n}: {', '.join(r)}" for n, r in f["refused"].items())
            self._print(f"[LVSA] backend={f['backend']} (auto on {f['device']})"
                        + (f" refused: {refused}" if refused else ""))
        elif k == "riflex":  # once per generation (lvsa.integrations.riflex)
            note = ("" if f["changed"] else
                    " (unchanged: T_lat <= reference)" if f["T"] <= f["reference"] else
                    " (unchanged: the period already covers T_lat)")
            self._print(f"[LVSA] riflex k={f['k']} period {f['period']:.1f}->{f['new_period']:.1f} latent frames "
                        f"(reference={f['reference']} T_lat={f['T']}){note}")
        elif k == "mask":
            self._print(f"[LVSA-MASK] step={f['step']} offset={f['offset']} sparsity={f['sparsity']:.3f}\n"
                        + f["picture"])
        elif k == "memory":
            self._print(f"[LVSA-MEM] step={f['step']} {f['device_kind']}={f['index']} alloc={_gb(f['alloc'])} "
                        f"reserved={_gb(f['reserved'])} peak={_gb(f['peak'])}")
        elif k == "step_time":
            self._print(f"[LVSA-TIME] step={f['step']} dt={f['dt']:.3f}s")
        elif k == "plugin_error":
            self._print(f"[LVSA-PLUGIN] plugin {f['plugin']!r} from {f['distribution']} failed to load "
                        f"and was skipped: {f['error']}")
        elif k == "warning":
            with self._lock:
                if ("warning", f["message"]) in self._seen_fallbacks:
                    return
                self._seen_fallbacks.add(("warning", f["message"]))
            self._print(f"[LVSA] WARNING {f['message']}")


def session_summary() -> Dict[str, Any]:
    return SESSION.as_dict()


def reset_session():
    SESSION.reset()


def find_sink(cls=DefaultSink) -> Optional[Any]:
    from .plugins import plugin_manager

    for p in plugin_manager().get_plugins():
        if isinstance(p, cls):
            return p
    return None
