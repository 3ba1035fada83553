"""The default log sink: prints the ``[LVSA]``, ``[LVSA-FALLBACK]``, ``[LVSA-MEM]``,
``[LVSA-TIME]``, ``[LVSA-MASK]`` and ``[LVSA-PLUGIN]`` lines of DESIGN.md §3.

Registered like any plugin (an ``lvsa_event`` hook). It holds the one print-once rule of
lvsa: :data:`PRINT_ONCE` names, per event kind, the fields whose values make a line new;
a line whose key was already printed in this process is not printed again. Emitters
decide which events exist (the engine announces ``engaged``/``schedule`` once per
generation); the sink alone decides which lines are repeats.
"""
from __future__ import annotations

import re
import sys
import threading

from .events import Event
from .hookspecs import hookimpl

#: event kind → the fields that make its line distinct (printed once per process)
PRINT_ONCE = {
    "fallback": ("origin", "reason", "seq_len"),
    "selection": ("backend", "device", "shape"),
    "compile": ("backend", "shape"),
    "compiled": ("backend", "shape"),
    "warning": ("message",),
    "notice": ("message",),
    "plugin_error": ("plugin", "error"),
}


#: a backend name followed by ``": "``: what starts each item of a ``refused:`` list
_REFUSED_NAME = re.compile(r"[\w.+-]+: ")


def format_refused(refused) -> str:
    """The ``refused:`` tail of the ``[LVSA] backend=…`` line: ``name: reason, reason; name: …``.

    A reason's own ``\\`` and ``;`` are written ``\\\\`` and ``\\;``, so ``"; "`` only ever
    separates backends; :func:`parse_refused` reads it back.
    """
    def esc(t: str) -> str:
        return t.replace("\\", "\\\\").replace(";", "\\;")
    return "; ".join(f"{n}: {esc(', '.join(r) if isinstance(r, (list, tuple)) else str(r))}"
                     for n, r in refused.items())


def parse_refused(text: str) -> dict:
    """``{name: reasons}`` from the tail :func:`format_refused` wrote.

    Logs written before reasons were escaped are read too: there a ``"; "`` splits only
    where a backend name and ``": "`` follow it, so a reason like ``needs X; got Y`` stays whole.
    """
    parts, cur, i, text = [], [], 0, text or ""
    while i < len(text):
        c = text[i]
        if c == "\\" and text[i + 1:i + 2] in ("\\", ";"):
            cur.append(text[i + 1])
            i += 2
        elif text.startswith("; ", i) and _REFUSED_NAME.match(text, i + 2):
            parts.append("".join(cur))
            cur, i = [], i + 2
        else:
            cur.append(c)
            i += 1
    parts.append("".join(cur))
    out = {}
    for part in parts:
        if ": " in part:
            name, why = part.split(": ", 1)
            out[name.strip()] = why.strip()
    return out


def rank_prefix():
    """Under ``torch.distributed`` with several ranks: ``None`` on ranks other than 0 (only
    rank 0 prints), or with ``LVSA_LOG_ALL_RANKS=1`` a ``"[rank N] "`` prefix on every rank;
    ``""`` in a single process."""
    dist = sys.modules.get("torch.distributed")  # never imported just for this
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
        return ""
    from .config import current_config

    rank = dist.get_rank()
    if current_config().log_all_ranks:
        return f"[rank {rank}] "
    return "" if rank == 0 else None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}GB"


class DefaultSink:
    """Prints the documented log lines (to stderr by default)."""

    def __init__(self, stream=None):
        self._stream = stream
        self._printed = set()
        self._lock = threading.Lock()

    @property
    def stream(self):
        return self._stream or sys.stderr

    def _print(self, line: str):
        prefix = rank_prefix()
        if prefix is None:
            return
        if prefix:
            line = "\n".join(prefix + part for part in line.split("\n"))
        print(line, file=self.stream, flush=True)

    def _first_time(self, event: Event) -> bool:
        keys = PRINT_ONCE.get(event.kind)
        if keys is None:
            return True
        key = (event.kind,) + tuple(repr(event.fields.get(k)) for k in keys)
        with self._lock:
            if key in self._printed:
                return False
            self._printed.add(key)
            return True

    @hookimpl
    def lvsa_event(self, event: Event):
        f = event.fields
        k = event.kind
        if k == "fallback" and not f.get("warn", True):
            return
        if not self._first_time(event):
            return
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
            skip = ("origin", "reason", "seq_len", "to", "warn")
            extra = " ".join(f"{a}={b}" for a, b in f.items() if a not in skip)
            extra = (" " + extra.replace(", ", ",")) if extra else ""
            target = "the REFERENCE backend" if f.get("to") == "reference" else "DENSE attention"
            self._print(f"[LVSA-FALLBACK] origin={f.get('origin')} reason={f.get('reason')} "
                        f"seq_len={f.get('seq_len')}{extra} -- falling back to {target} "
                        "(set LVSA_WARN_FALLBACK=0 to silence)")
        elif k == "selection":
            refused = format_refused(f["refused"])
            self._print(f"[LVSA] backend={f['backend']} (auto on {f['device']})"
                        + (f" refused: {refused}" if refused else ""))
            if f.get("why"):
                self._print(f"[LVSA] auto chose {f['backend']} by {f['why']}")
        elif k == "compile":
            self._print(f"[LVSA] compiling {f['backend']} for {f['shape']}... (first use; "
                        "`lvsa warmup` builds it ahead)")
        elif k == "compiled":
            self._print(f"[LVSA] {f['backend']} for {f['shape']} compiled in {f['seconds']:.1f}s")
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
            what = f.get("what") or "failed to load and was skipped"
            self._print(f"[LVSA-PLUGIN] plugin {f['plugin']!r} from {f['distribution']} {what}: "
                        f"{f['error']}")
        elif k == "warning":
            self._print(f"[LVSA] WARNING {f['message']}")
        elif k == "notice":  # information, not a problem (a changed unit, ...)
            self._print(f"[LVSA] {f['message']}")
