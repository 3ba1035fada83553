"""lvsa telemetry sink: append every event as one JSON line to ``$LVSA_JSONL_PATH``.

Unset (or empty) ``LVSA_JSONL_PATH`` disables the sink. Each line is
``{"kind": ..., "time": <unix seconds>, "pid": ..., **fields}``; values JSON cannot hold
are written as strings. Lines are appended and flushed one by one, so several processes
(ranks) can share one file and a crash loses nothing already emitted.
"""
import json
import os
import threading

from lvsa.config import Setting, p_str
from lvsa.hookspecs import hookimpl

_lock = threading.Lock()

PATH_SETTING = Setting("LVSA_JSONL_PATH", p_str, None,
                       "append every lvsa event as one JSON line to this file (unset: off)",
                       owner="lvsa-jsonl")


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    return str(v)


@hookimpl
def lvsa_settings():
    return [PATH_SETTING]


@hookimpl
def lvsa_event(event):
    path = PATH_SETTING.read()
    if not path:
        return
    rec = {"kind": event.kind, "time": round(event.time, 6), "pid": os.getpid()}
    rec.update(_plain(event.fields))
    line = json.dumps(rec, separators=(",", ":")) + "\n"
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(line)
