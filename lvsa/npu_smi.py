"""Read Ascend NPU state from ``npu-smi`` (the Ascend counterpart of ``nvidia-smi``).

:func:`parse_info` reads ``npu-smi info``; :func:`parse_usages` reads
``npu-smi info -t usages -i N``; :func:`query` runs them and returns an
:class:`SmiInfo`, or a reason string when ``npu-smi`` is missing or fails: it never
raises. Used by ``lvsa info`` (through :func:`query_summary`) and the benchmarks on
Ascend machines.

The table parser is driven by the header titles, not by column positions, so it
reads every known layout:

* Atlas A2 (910B): two header lines ``NPU Name | Health | Power(W) Temp(C)
  Hugepages-Usage(page)`` / ``Chip | Bus-Id | AICore(%) Memory-Usage(MB)
  HBM-Usage(MB)``, then one NPU row and one chip row per card; pairs such as
  ``65099/ 65536`` (no space before ``/`` once the used figure has five digits);
* Atlas A3: chip header ``Chip  Phy-ID``, an NPU row + chip row per chip (two per
  NPU), the second chip's power printed ``-``;
* 310P: chip header ``Chip    Device`` and no HBM column (device memory is
  ``Memory-Usage``);
* Ascend 950: one header line of single-title cells ``| NPU ID | Name | ... |`` with
  ``NPU Util(%)`` in place of ``AICore(%)``;
* the process table, including ``No running processes found in NPU N``.

Missing figures (``-``, ``NA``) are ``None``. Per-NPU figures aggregate the chips:
power summed, temperature the maximum, utilisation the mean, memory summed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

_PAIR = re.compile(r"^(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
_TOKEN = re.compile(r"\d+(?:\.\d+)?\s*/\s*\d+(?:\.\d+)?|\S+")
_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
_VERSION = re.compile(r"npu-smi\s+(\S+)\s+Version:\s*(\S+)")
_IDLE = re.compile(r"No running processes found in NPU\s+(\d+)", re.I)

# normalised header title -> field
_FIELDS = {
    "npu": "npu", "npu id": "npu", "name": "name", "health": "health", "power": "power",
    "temp": "temp", "hugepages-usage": "hugepages", "chip": "chip", "chip id": "chip",
    "phy-id": "phy", "device": "phy", "device id": "phy", "bus-id": "bus", "aicore": "util",
    "npu util": "util", "memory-usage": "memory", "hbm-usage": "hbm", "process id": "pid",
    "process name": "pname", "process memory": "pmem",
}


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class SmiProcess:
    npu_id: int
    chip_id: Optional[int]
    pid: int
    name: str
    memory_mb: Optional[int]


@dataclass(frozen=True)
class SmiUsage:
    """One chip block of ``npu-smi info -t usages -i N`` (``fields`` holds every line)."""

    npu_id: Optional[int]
    chip_id: Optional[int]
    hbm_capacity_mb: Optional[float]
    hbm_usage_percent: Optional[float]
    aicore_percent: Optional[float]
    npu_util_percent: Optional[float]
    fields: Dict[str, Union[int, float, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class SmiChip:
    chip_id: int
    phy_id: Optional[int] = None  # A3 "Phy-ID", 310P "Device"
    bus_id: Optional[str] = None
    health: Optional[str] = None
    power_w: Optional[float] = None
    temp_c: Optional[float] = None
    #: ``AICore(%)`` or, on Ascend 950, ``NPU Util(%)`` (see :attr:`SmiInfo.util_label`)
    aicore_percent: Optional[float] = None
    memory_used_mb: Optional[int] = None
    memory_total_mb: Optional[int] = None
    hbm_used_mb: Optional[int] = None
    hbm_total_mb: Optional[int] = None
    hugepages_used: Optional[int] = None
    hugepages_total: Optional[int] = None


def _sum(values) -> Optional[float]:
    vals = [x for x in values if x is not None]
    return sum(vals) if vals else None


@dataclass(frozen=True)
class SmiNpu:
    npu_id: int
    name: str
    chips: Tuple[SmiChip, ...]
    processes: Tuple[SmiProcess, ...] = ()
    #: npu-smi said "No running processes found in NPU n"
    idle: bool = False
    usages: Tuple[SmiUsage, ...] = ()

    @property
    def health(self) -> Optional[str]:
        hs = [c.health for c in self.chips if c.health]
        bad = [h for h in hs if h.upper() != "OK"]
        return bad[0] if bad else (hs[0] if hs else None)

    @property
    def power_w(self) -> Optional[float]:
        return _sum(c.power_w for c in self.chips)

    @property
    def temp_c(self) -> Optional[float]:
        vals = [c.temp_c for c in self.chips if c.temp_c is not None]
        return max(vals) if vals else None

    @property
    def aicore_percent(self) -> Optional[float]:
        vals = [c.aicore_percent for c in self.chips if c.aicore_percent is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def hbm_used_mb(self) -> Optional[int]:
        return _sum(c.hbm_used_mb for c in self.chips)

    @property
    def hbm_total_mb(self) -> Optional[int]:
        return _sum(c.hbm_total_mb for c in self.chips)

    @property
    def memory_used_mb(self) -> Optional[int]:
        """HBM when the card has it, else device memory (310P)."""
        hbm = self.hbm_used_mb
        return hbm if hbm is not None else _sum(c.memory_used_mb for c in self.chips)

    @property
    def memory_total_mb(self) -> Optional[int]:
        hbm = self.hbm_total_mb
        return hbm if hbm is not None else _sum(c.memory_total_mb for c in self.chips)

    def describe(self, util_label: str = "AICore") -> str:
        def f(x, unit, fmt="{:g}"):
            return "?" + unit if x is None else fmt.format(x) + unit

        mem = ("memory ?" if self.memory_total_mb is None else
               f"{'HBM' if self.hbm_total_mb is not None else 'memory'} "
               f"{self.memory_used_mb:g}/{self.memory_total_mb:g} MB")
        util = f(self.aicore_percent, "%", "{:.0f}")
        return (f"npu:{self.npu_id} {self.name} ({len(self.chips)} chip"
                f"{'s' if len(self.chips) != 1 else ''}) health={self.health or '?'} "
                f"power={f(self.power_w, 'W')} temp={f(self.temp_c, 'C')} {util_label}={util} "
                f"{mem} processes={len(self.processes)}")


@dataclass(frozen=True)
class SmiInfo:
    npus: Tuple[SmiNpu, ...]
    version: Optional[str] = None
    #: the utilisation column as printed: ``AICore(%)`` or ``NPU Util(%)``
    util_label: str = "AICore(%)"
    processes: Tuple[SmiProcess, ...] = ()
    #: reasons a ``-t usages`` query failed, per NPU id
    usage_errors: Dict[int, str] = field(default_factory=dict)

    def npu(self, npu_id: int) -> SmiNpu:
        for n in self.npus:
            if n.npu_id == npu_id:
                return n
        raise KeyError(f"npu-smi listed no NPU {npu_id}; have {[n.npu_id for n in self.npus]}")

    def lines(self) -> List[str]:
        label = self.util_label.replace("(%)", "")
        head = f"npu-smi {self.version}" if self.version else "npu-smi"
        return [head] + [n.describe(label) for n in self.npus]

    def to_dict(self) -> dict:
        out = asdict(self)
        for d, n in zip(out["npus"], self.npus):
            for k in ("health", "power_w", "temp_c", "aicore_percent", "hbm_used_mb",
                      "hbm_total_mb", "memory_used_mb", "memory_total_mb"):
                d[k] = getattr(n, k)
        return out


# ------------------------------------------------------------------ values
def _num(s: Optional[str]):
    if s is None:
        return None
    s = s.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return None  # "-", "NA", "N/A", ""


def _pair(s: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    m = _PAIR.match(s.strip()) if s else None
    return (_num(m.group(1)), _num(m.group(2))) if m else (None, None)


def _key(title: str) -> str:
    return re.sub(r"\(.*?\)", "", title).strip().lower()


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _titles(cells: Sequence[str]) -> List[List[str]]:
    return [[t for t in re.split(r"\s{2,}", c) if t] for c in cells]


def _row(titles: List[List[str]], cells: Sequence[str]) -> Dict[str, str]:
    """Map a data row onto the header titles; ``{field: raw text}``."""
    out: Dict[str, str] = {}
    for tcell, cell in zip(titles, cells):
        if not tcell:
            continue
        toks = [cell] if len(tcell) == 1 else _TOKEN.findall(cell)
        if len(toks) > len(tcell):
            toks = toks[:len(tcell) - 1] + [" ".join(toks[len(tcell) - 1:])]
        for t, v in zip(tcell, toks):
            fld = _FIELDS.get(_key(t))
            if fld:
                out[fld] = v
    return out


def _chip(rec: Dict[str, str], default_chip: int) -> SmiChip:
    chip = _num(rec.get("chip"))
    mem_u, mem_t = _pair(rec.get("memory"))
    hbm_u, hbm_t = _pair(rec.get("hbm"))
    hp_u, hp_t = _pair(rec.get("hugepages"))
    return SmiChip(
        chip_id=default_chip if chip is None else int(chip), phy_id=_num(rec.get("phy")),
        bus_id=rec.get("bus") or None, health=rec.get("health") or None,
        power_w=_num(rec.get("power")), temp_c=_num(rec.get("temp")),
        aicore_percent=_num(rec.get("util")), memory_used_mb=mem_u, memory_total_mb=mem_t,
        hbm_used_mb=hbm_u, hbm_total_mb=hbm_t, hugepages_used=hp_u, hugepages_total=hp_t)


# ------------------------------------------------------------------ parsers
def parse_info(text: str) -> SmiInfo:
    """Parse ``npu-smi info``. Raises ``ValueError`` when no NPU row is found."""
    version = None
    dev_titles: Optional[List[List[str]]] = None
    chip_titles: Optional[List[List[str]]] = None
    proc_titles: Optional[List[List[str]]] = None
    util_label = "AICore(%)"
    section = None  # "dev" | "proc"
    records: List[Tuple[int, str, SmiChip]] = []  # (npu id, name, chip)
    last_npu: Optional[Dict[str, str]] = None
    npu_consumed = True
    procs: List[SmiProcess] = []
    idle: set = set()

    def add(rec: Dict[str, str]):
        npu_id = _num(rec.get("npu"))
        if npu_id is None:
            return
        n_same = sum(1 for r in records if r[0] == npu_id)
        records.append((int(npu_id), rec.get("name", "") or "", _chip(rec, n_same)))

    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        m = _VERSION.search(line)
        if m:
            version = m.group(2)
            continue
        m = _IDLE.search(line)
        if m:
            idle.add(int(m.group(1)))
            continue
        first = cells[0]
        if re.match(r"^(NPU|Chip)\b", first, re.I):  # a header line
            titles = _titles(cells)
            if any("process" in c.lower() for c in cells):
                proc_titles, section = titles, "proc"
            elif first.lower().startswith("chip"):
                chip_titles, section = titles, "dev"
            else:
                dev_titles, section = titles, "dev"
            for t in (t for tc in titles for t in tc):
                if _FIELDS.get(_key(t)) == "util":
                    util_label = t
            continue
        if section == "proc" and proc_titles:
            r = _row(proc_titles, cells)
            pid, npu_id = _num(r.get("pid")), _num(r.get("npu"))
            if pid is not None and npu_id is not None:
                chip = _num(r.get("chip"))
                procs.append(SmiProcess(int(npu_id), None if chip is None else int(chip), int(pid),
                                        r.get("pname", ""), _num(r.get("pmem"))))
            continue
        if section != "dev" or dev_titles is None:
            continue
        is_chip = chip_titles is not None and (
            (len(cells) > 1 and _BUS_ID.match(cells[1])) or not npu_consumed)
        if is_chip and last_npu is not None:
            rec = dict(last_npu)
            if npu_consumed:  # a further chip row under one NPU row: report power once
                rec.pop("power", None)
            rec.update(_row(chip_titles, cells))
            add(rec)
            npu_consumed = True
        else:
            if not npu_consumed and last_npu is not None:
                add(last_npu)
            last_npu = _row(dev_titles, cells)
            npu_consumed = False
            if chip_titles is None:  # single-line layout (Ascend 950): the row is the chip
                add(last_npu)
                npu_consumed = True
    if not npu_consumed and last_npu is not None:
        add(last_npu)
    if not records:
        raise ValueError("no NPU rows found in npu-smi info output")

    order: List[int] = []
    by_id: Dict[int, List[Tuple[str, SmiChip]]] = {}
    for npu_id, name, chip in records:
        if npu_id not in by_id:
            order.append(npu_id)
            by_id[npu_id] = []
        by_id[npu_id].append((name, chip))
    npus = tuple(
        SmiNpu(i, next((nm for nm, _ in by_id[i] if nm), ""), tuple(c for _, c in by_id[i]),
               tuple(p for p in procs if p.npu_id == i), i in idle)
        for i in order)
    return SmiInfo(npus, version, util_label, tuple(procs))


def parse_usages(text: str) -> List[SmiUsage]:
    """Parse ``npu-smi info -t usages -i N``: one :class:`SmiUsage` per chip block
    (each block ends with its ``Chip ID`` line)."""
    npu_id = None
    block: Dict[str, Union[int, float, str]] = {}
    out: List[SmiUsage] = []
    for raw in text.splitlines():
        if ":" not in raw:
            continue
        k, v = (s.strip() for s in raw.split(":", 1))
        val = _num(v)
        val = v if val is None else val
        if k == "NPU ID":
            npu_id = val if isinstance(val, int) else None
            continue
        if k == "Chip Count":
            continue
        block[k] = val
        if k == "Chip ID":
            out.append(_usage(npu_id, block))
            block = {}
    if block:  # a block without its Chip ID line (older drivers)
        out.append(_usage(npu_id, block))
    if not out:
        raise ValueError("no 'Key : value' lines in npu-smi usages output")
    return out


def _usage(npu_id, block) -> SmiUsage:
    def g(key):
        v = block.get(key)
        return v if isinstance(v, (int, float)) else None

    chip = g("Chip ID")
    return SmiUsage(npu_id, chip, g("HBM Capacity(MB)"), g("HBM Usage Rate(%)"),
                    g("Aicore Usage Rate(%)"), g("NPU Utilization(%)"), dict(block))


# ------------------------------------------------------------------ running
def _run(args: List[str], timeout: float) -> Tuple[Optional[str], Optional[str]]:
    """``(stdout, None)`` or ``(None, reason)``."""
    cmd = " ".join(["npu-smi"] + args[1:])
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"`{cmd}` timed out after {timeout:g}s"
    except OSError as e:
        return None, f"could not run `{cmd}`: {e}"
    if p.returncode != 0:
        msg = (p.stderr or p.stdout or "").strip().splitlines()
        return None, (f"`{cmd}` exited with status {p.returncode}"
                      + (f": {msg[0].strip()}" if msg else ""))
    return p.stdout, None


def query(usages: bool = False, binary: str = "npu-smi", timeout: float = 15.0
          ) -> Union[SmiInfo, str]:
    """Run ``npu-smi info`` (and, with ``usages``, ``npu-smi info -t usages -i N`` per
    NPU). Returns an :class:`SmiInfo`, or a reason string (never raises)."""
    try:
        exe = shutil.which(binary)
        if exe is None:
            return (f"{binary} not found on PATH (it ships with the Ascend driver, usually "
                    "/usr/local/sbin/npu-smi; install the driver or add it to PATH)")
        text, reason = _run([exe, "info"], timeout)
        if reason:
            return reason
        try:
            info = parse_info(text)
        except ValueError as e:
            head = (text or "").strip().splitlines()[:1]
            return f"could not read `npu-smi info` output ({e}; first line: {head[0] if head else ''!r})"
        if not usages:
            return info
        npus, errors = [], {}
        for n in info.npus:
            out, reason = _run([exe, "info", "-t", "usages", "-i", str(n.npu_id)], timeout)
            if reason is None:
                try:
                    npus.append(replace(n, usages=tuple(parse_usages(out))))
                    continue
                except ValueError as e:
                    reason = f"could not read usages of NPU {n.npu_id}: {e}"
            errors[n.npu_id] = reason
            npus.append(n)
        return replace(info, npus=tuple(npus), usage_errors=errors)
    except Exception as e:  # noqa: BLE001 - a probe never breaks lvsa
        return f"npu-smi query failed: {type(e).__name__}: {e}"


def query_summary(binary: str = "npu-smi", timeout: float = 15.0) -> Optional[str]:
    """The ``npu-smi`` lines ``lvsa info`` prints: one per NPU, or the reason it could not
    run. ``None`` on a machine with neither ``npu-smi`` nor ``torch_npu`` (not an Ascend
    host: nothing to say). Never raises."""
    try:
        if shutil.which(binary) is None:
            import importlib.util

            if importlib.util.find_spec("torch_npu") is None:
                return None
        r = query(binary=binary, timeout=timeout)
        return r if isinstance(r, str) else "\n  ".join(r.lines())
    except Exception as e:  # noqa: BLE001
        return f"npu-smi query failed: {type(e).__name__}: {e}"
