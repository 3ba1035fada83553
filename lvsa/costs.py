"""What automatic backend selection compares: measured costs per device and shape class.

Plain data, no backend code: the shipped tables (``lvsa/data/costs-*.json``, made by
``benchmarks/make_cost_table.py`` from committed benchmark results) and the on-disk cache
of timed probes (``LVSA_AUTOTUNE=1``). Both are keyed by the device's name (``"NVIDIA
H200"``) and a :class:`ShapeClass`; a cost is a backend's attention time relative to
dense attention of the same shape (table) or its measured milliseconds (probe): lower
is faster either way, and only costs from one source are ever compared.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

#: format tag of the shipped tables and of the probe cache
TABLE_FORMAT = "lvsa-costs/1"
DATA_DIR = Path(__file__).resolve().parent / "data"
#: mask density bucket edges (density counts attended video blocks)
DENSITY_EDGES = (0.2, 0.35, 0.5, 0.7, 0.95)
#: query-head bucket edges (upper bounds: 1-12, 13-24, 25+)
HEAD_EDGES = (12, 24)


@dataclass(frozen=True)
class ShapeClass:
    """The part of an attention problem that decides which backend is fastest."""

    density: str  # bucket label, e.g. "0.20-0.35"
    heads: str  # bucket label, e.g. "13-24"
    head_dim: int
    text: bool

    @property
    def key(self) -> str:
        return f"density {self.density}|heads {self.heads}|D{self.head_dim}|{'text' if self.text else 'video'}"

    def __str__(self) -> str:
        return (f"density {self.density}, {self.heads} heads, head_dim {self.head_dim}, "
                f"{'with' if self.text else 'no'} text")


def _bucket(value: float, edges, fmt) -> str:
    lo = None
    for e in edges:
        if value < e if isinstance(e, float) else value <= e:
            break
        lo = e
    else:
        return f">={fmt(edges[-1])}" if isinstance(edges[-1], float) else f"{edges[-1] + 1}+"
    if isinstance(edges[0], float):
        return f"<{fmt(edges[0])}" if lo is None else f"{fmt(lo)}-{fmt(e)}"
    return f"1-{e}" if lo is None else f"{lo + 1}-{e}"


@functools.lru_cache(maxsize=4096)
def shape_class(num_heads: int, head_dim: int, text_len: int, density: Optional[float]) -> ShapeClass:
    """The class of a problem; ``density`` ``None`` (not known) is the bucket ``"?"``."""
    d = "?" if density is None else _bucket(float(density), DENSITY_EDGES, lambda x: f"{x:.2f}")
    return ShapeClass(d, _bucket(int(num_heads), HEAD_EDGES, str), int(head_dim), bool(text_len))


def device_name(device) -> str:
    """The name cost tables are keyed by: the GPU's (``"NVIDIA H200"``), else the kind."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    mod = getattr(torch, dev.type, None)
    get = getattr(mod, "get_device_name", None) if dev.type != "cpu" else None
    if get is not None:
        try:
            return str(get(dev.index or 0))
        except Exception:  # noqa: BLE001 - a name is a nicety; the kind will do
            pass
    return dev.type


# ------------------------------------------------------------- shipped tables
def load_table(path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != TABLE_FORMAT or "device" not in doc or "rows" not in doc:
        raise ValueError(f"{path} is not an lvsa cost table (format {TABLE_FORMAT!r} with device and rows)")
    return doc


@functools.lru_cache(maxsize=4)
def tables(data_dir: str = str(DATA_DIR)) -> Dict[str, dict]:
    """Device name → its shipped table (every ``costs-*.json`` in ``data_dir``)."""
    out = {}
    for p in sorted(Path(data_dir).glob("costs-*.json")):
        doc = load_table(p)
        out[doc["device"]] = {**doc, "path": p.name}
    return out


def table_row(device: str, cls: ShapeClass) -> Optional[dict]:
    """The shipped row for ``device`` and ``cls``: ``{"costs": {backend: relative time},
    "shapes": [...], "table": file name}``, or ``None``."""
    t = tables(str(DATA_DIR)).get(device)
    row = None if t is None else t["rows"].get(cls.key)
    return None if row is None else {**row, "table": t["path"]}


# ------------------------------------------------------------- probe cache
def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lvsa" / "probe-costs.json"


class ProbeCache:
    """Timed probe results on disk: ``{device: {class key: {backend: ms}}}``.

    Read fresh on every :meth:`get` (another process may have probed); written atomically.
    A file that is not a probe cache is reported, never overwritten.
    """

    def __init__(self, path=None):
        self.path = Path(path) if path else default_cache_path()

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"format": TABLE_FORMAT, "probes": {}}
        except (OSError, ValueError) as e:
            raise ValueError(f"LVSA_COST_CACHE {self.path} cannot be read as an lvsa probe cache ({e}); "
                             "delete it or point LVSA_COST_CACHE elsewhere") from None
        if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
            raise ValueError(f"LVSA_COST_CACHE {self.path} is not an lvsa probe cache "
                             f"(no format {TABLE_FORMAT!r}); delete it or point LVSA_COST_CACHE elsewhere")
        return doc

    def get(self, device: str, cls: ShapeClass) -> Optional[dict]:
        """``{"ms": {backend: ms}, "errors": {...}, "time": ...}`` or ``None``."""
        return self._read()["probes"].get(device, {}).get(cls.key)

    def put(self, device: str, cls: ShapeClass, ms: Dict[str, float], errors: Dict[str, str],
            problem: str = "") -> dict:
        doc = self._read()
        entry = {"ms": ms, "errors": errors, "problem": problem,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        doc["probes"].setdefault(device, {})[cls.key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".probe-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, self.path)
        return entry
