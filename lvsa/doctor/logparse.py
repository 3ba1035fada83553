"""Read a run log into structured records, each with its line number.

The parser knows the lines lvsa prints (DESIGN.md §3, :mod:`lvsa.telemetry`,
``lvsa generate``'s ``[export]`` line, summary and decode messages), the same lines in
the published LVSA format, and the surrounding context a diagnosis needs: Python
tracebacks and out-of-memory errors, progress bars, vllm-omni's attention-backend
lines, ``LVSA_*`` assignments, container commands, model names and quality metrics.

Every record keeps ``lineno`` (1-based, as an editor shows it) and the line's ``text``,
so a finding can quote its evidence. Progress bars rewritten with ``\\r`` stay on the
line they were printed on; their last state counts.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..presets import ALIASES
from ..sink import parse_refused

__all__ = ["LogRecord", "ParsedLog", "UnreadableInput", "parse_log", "parse_fields", "read_input"]


class UnreadableInput(ValueError):
    """The input is empty, binary, or holds nothing a run log would."""


@dataclass(frozen=True)
class LogRecord:
    lineno: int
    kind: str
    text: str
    fields: Dict[str, Any] = field(default_factory=dict)

    def get(self, key, default=None):
        return self.fields.get(key, default)


# ------------------------------------------------------------------ k=v fields
_KV = re.compile(r"""([A-Za-z_][\w.]*)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\[[^\]]*\]|\{[^}]*\}|[^\s]+)""")


def _value(raw: str) -> Any:
    if raw[:1] not in "'\"[{":
        raw = raw.rstrip(",;")  # "T_lat=37 P=16, 2 steps"
    if raw[:1] in "'\"[{":
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw.strip("'\"")
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def parse_fields(s: str) -> Dict[str, Any]:
    """``a=1 b=[1,2] c='x y'`` → ``{"a": 1, "b": [1, 2], "c": "x y"}``."""
    return {m.group(1): _value(m.group(2)) for m in _KV.finditer(s)}


# ------------------------------------------------------------------ patterns
_INT = r"(\d+)"
P_SCHEDULE = re.compile(r"\[LVSA\] reference_latent_frames=(\d+) target_latent_frames=(\d+) "
                        r"extension_ratio=([\d.]+)x")
P_KFI = re.compile(r"\[LVSA\] (computed|fixed) key_frame_interval=(\d+)")
P_KFI_SUMMARY = re.compile(r"\[LVSA\] kfi=(\d+) global_count=(\d+) attended_per_frame=(\d+)/(\d+)")
P_ENGAGED = re.compile(r"\[LVSA\] engaged(?: \((?P<family>[\w.-]+)\))?: (?P<rest>.*?)->\s*(?P<mode>SPARSE|DENSE)")
P_FALLBACK = re.compile(r"\[LVSA-FALLBACK\] (?P<body>.*?)(?:\s+--\s+falling back to (?P<target>.*?))?\s*$")
P_SELECTION = re.compile(r"\[LVSA\] backend=(?P<backend>\S+) \(auto on (?P<device>[^)]+)\)(?: refused: (?P<refused>.*))?")
P_WARNING = re.compile(r"\[LVSA\] WARNING (?P<message>.*)")
P_PLUGIN = re.compile(r"\[LVSA-PLUGIN\] (?P<message>.*)")
P_MASK = re.compile(r"\[LVSA-MASK\] step=(\d+) offset=(\d+) sparsity=([\d.]+)")
P_MEM = re.compile(r"\[LVSA-MEM\] (?P<body>.*)")
P_TIME = re.compile(r"\[LVSA-TIME\] step=(\d+) dt=([\d.]+)s")
P_LVSA_ANY = re.compile(r"\[LVSA(?:-[A-Z]+)?\]")
P_EXPORT = re.compile(r"\[export\] (?P<path>.+?)(?: \((?P<secs>[\d.]+)s\))?\s*$")
P_DECODE_OOM = re.compile(r"lvsa (?P<cmd>generate|decode): error: the VAE decode ran out of memory.*?"
                          r"latent is safe at (?P<latent>\S+?)\.?(?:\s|$)")
P_LVSA_DECODE_CMD = re.compile(r"^\s*lvsa decode (?P<latent>\S+)(?: --output (?P<output>\S+))?\s*$")
P_CONTAINER_WARN = re.compile(r"running inside a container \((?P<why>[^)]*)\) and (?P<flag>--[\w-]+) (?P<path>\S+) "
                              r"is not on a bind mount")
P_OOM = re.compile(r"(OutOfMemoryError|out of memory|\bMemoryError\b|ACL_ERROR_RT_MEMORY|NPU out of memory"
                   r"|RESOURCE_EXHAUSTED)", re.I)
P_TRACEBACK = re.compile(r"^\s*Traceback \(most recent call last\):")
P_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
P_PROGRESS = re.compile(r"(?:(?P<desc>[\w .-]*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
P_VLLM_BACKEND = re.compile(r"(?:Using|Resolved) diffusion attention backend '?(?P<backend>[\w.-]+)'?"
                            r"|Defaulting to diffusion attention backend (?P<default>[\w.-]+)")
P_VLLM = re.compile(r"vllm[_-]omni|vllm_omni|\bvllm serve\b.*--omni|\bDiffusionEngine\b|\bOmniDiffusion|"
                    r"diffusion_engine\.py|--diffusion-attention", re.I)
P_ATTN_CONFIG = re.compile(r"--diffusion-attention-config[= ]\s*(?P<value>'[^']*'|\"(?:[^\"\\]|\\.)*\"|\S+)"
                           r"|--diffusion-attention-config\.per_role\.self\.backend[= ](?P<dotted>\S+)")
P_SERVE_WRAPPER = re.compile(r"lvsa_vllm_omni\.serve")
P_ENV = re.compile(r"(?<![\w$])(?P<name>LVSA_[A-Z0-9_]+|DIFFUSION_ATTENTION_BACKEND)=(?P<value>'[^']*'|\"[^\"]*\"|[^\s;&|)]*)")
P_CONTAINER = re.compile(r"\bdocker (?:run|exec|compose)\b|\bpodman run\b|/\.dockerenv|/run/\.containerenv|"
                         r"\bkubectl (?:logs|exec|run)\b|running inside a container", re.I)
P_BIND = re.compile(r"(?:-v|--volume)[ =](?P<src>[^\s:]+):(?P<dst>/[^\s:]*)")
P_WORKDIR = re.compile(r"(?:-w|--workdir)[ =](?P<dir>/\S*)")
P_METRIC = re.compile(r"\b(?P<metric>dynamic_quality|motion_smoothness|loop_quality|dynamic_degree)\b\D{0,40}?"
                      r"(?P<value>-?\d+(?:\.\d+)?)", re.I)
P_GEN_SUMMARY = re.compile(r"^\s{2}(?P<key>model|video|lvsa|schedule|peak mem|latent|output):\s+(?P<value>.*)$")
P_GEN_DONE = re.compile(r"^lvsa (?P<cmd>generate|decode): done in")
P_LOGLEVEL = re.compile(r"\b(INFO|WARNING|WARN|ERROR|DEBUG|CRITICAL)\b")
P_CLI_LVSA = re.compile(r"(?:^|\s)--(?P<flag>lvsa|no-lvsa)(?=\s|$)")
# versions: vllm-omni's own (its version check, pip freeze/list, a wheel name) and vLLM's
_V = r"(?P<v>\d+\.\d+[\w.+]*)"
P_OMNI_VERSION = re.compile(r"(?<![\w-])vllm[-_ ]omni(?:==|\s+version\s+|\s+v|-)" + _V, re.I)
P_OMNI_LIST_ROW = re.compile(r"^\s*vllm[-_]omni\s+" + _V + r"\s*$", re.I)
P_VLLM_VERSION = re.compile(r"(?<![\w-])vLLM (?:API server )?version " + _V + r"|(?<![\w-])vllm==" + _V.replace("v>", "eq>"),
                            re.I)
P_PIP_SHOW_NAME = re.compile(r"^\s*Name:\s*(?P<name>vllm[-_]omni|vllm)\s*$", re.I)
P_PIP_SHOW_VERSION = re.compile(r"^\s*Version:\s*" + _V)

# model families (lvsa adapter families); order matters: the first match wins per line
_FAMILY_PATTERNS: Tuple[Tuple[str, str, "re.Pattern"], ...] = (
    ("wan", "wan2.2-ti2v-5b", re.compile(r"ti2v[-_]?5b", re.I)),
    ("hunyuan", "hunyuanvideo-1.5", re.compile(r"hunyuan\s*video[-_ ]?1\.?5|HunyuanVideo15|tiny-hunyuan|"
                                               r"engaged \(hunyuan\)|hunyuan", re.I)),
    ("cogvideox", "cogvideox-5b", re.compile(r"cogvideox|tiny-cogvideox", re.I)),
    ("wan", "wan2.1-t2v-1.3b", re.compile(r"\bwan[-_ ]?2\.[12]|WanPipeline|WanTransformer3DModel|tiny-wan|"
                                          r"engaged \(wan\)|Wan-AI", re.I)),
)


# ------------------------------------------------------------------ the log
@dataclass
class ParsedLog:
    """All records of one input, plus a few derived facts."""

    source: str
    lines: List[str]
    records: List[LogRecord]

    def of(self, *kinds: str) -> List[LogRecord]:
        return [r for r in self.records if r.kind in kinds]

    def first(self, *kinds: str) -> Optional[LogRecord]:
        for r in self.records:
            if r.kind in kinds:
                return r
        return None

    def line(self, lineno: int) -> str:
        return self.lines[lineno - 1] if 1 <= lineno <= len(self.lines) else ""

    @property
    def lvsa_lines(self) -> List[LogRecord]:
        return self.of("lvsa_line")

    def env(self) -> Dict[str, LogRecord]:
        """The last value the log shows for each ``LVSA_*`` (and ``DIFFUSION_ATTENTION_BACKEND``)."""
        out: Dict[str, LogRecord] = {}
        for r in self.of("env"):
            out[r.fields["name"]] = r
        return out

    def families(self) -> List[Tuple[str, str, LogRecord]]:
        """``(family, preset, record)`` for every line that names a model family."""
        return [(r.fields["family"], r.fields["preset"], r) for r in self.of("model")]

    def family(self) -> Optional[Tuple[str, str, LogRecord]]:
        """The model family of the run: engaged lines first, then the most specific mention."""
        for r in self.of("engaged"):
            fam = r.get("family")
            if fam in ALIASES:
                preset = next((p for f, p, _ in self.families() if f == fam), None)
                return fam, preset or ALIASES[fam], r
        fams = self.families()
        if not fams:
            return None
        # a TI2V-5B mention is more specific than a plain "Wan" one
        for f, p, r in fams:
            if p == "wan2.2-ti2v-5b":
                return f, p, r
        return fams[0]

    @property
    def is_vllm_omni(self) -> bool:
        return bool(self.of("vllm", "vllm_backend", "attention_config", "serve_wrapper"))

    @property
    def is_container(self) -> bool:
        return bool(self.of("container", "container_warning"))

    def looks_like_a_log(self) -> bool:
        """Whether anything in the input is what a generation run prints."""
        meaningful = {k for k in (r.kind for r in self.records)} - {"loglevel"}
        return bool(meaningful) or len(self.of("loglevel")) >= 2


def _mem_fields(body: str) -> Dict[str, Any]:
    f = parse_fields(body)
    for k in ("alloc", "reserved", "peak"):
        v = f.get(k)
        if isinstance(v, str) and v.endswith("GB"):
            try:
                f[k] = float(v[:-2])
            except ValueError:
                pass
    return f


def _lvsa_record(i: int, seg: str) -> LogRecord:
    m = P_SCHEDULE.search(seg)
    if m:
        return LogRecord(i, "schedule", seg, {"reference": int(m[1]), "T": int(m[2]), "extension_ratio": float(m[3])})
    m = P_KFI_SUMMARY.search(seg)
    if m:
        return LogRecord(i, "kfi_summary", seg, {"kfi": int(m[1]), "global_count": int(m[2]),
                                                 "attended": int(m[3]), "T": int(m[4])})
    m = P_KFI.search(seg)
    if m:
        return LogRecord(i, "kfi", seg, {"auto": m[1] == "computed", "kfi": int(m[2])})
    m = P_ENGAGED.search(seg)
    if m:
        f = parse_fields(m["rest"])
        f.update(family=m["family"], mode=m["mode"], dense=m["mode"] == "DENSE")
        if "|G|" in m["rest"]:
            g = re.search(r"\|G\|=(\d+)", m["rest"])
            if g:
                f["global_count"] = int(g[1])
        return LogRecord(i, "engaged", seg, f)
    m = P_FALLBACK.search(seg)
    if m:
        f = parse_fields(m["body"])
        f["target"] = m["target"]
        return LogRecord(i, "fallback", seg, f)
    m = P_SELECTION.search(seg)
    if m:
        refused: Dict[str, str] = parse_refused(m["refused"] or "")
        return LogRecord(i, "selection", seg, {"backend": m["backend"], "device": m["device"], "refused": refused})
    m = P_WARNING.search(seg)
    if m:
        return LogRecord(i, "warning", seg, {"message": m["message"]})
    m = P_PLUGIN.search(seg)
    if m:
        return LogRecord(i, "plugin_error", seg, {"message": m["message"]})
    m = P_MASK.search(seg)
    if m:
        return LogRecord(i, "mask", seg, {"step": int(m[1]), "offset": int(m[2]), "sparsity": float(m[3])})
    m = P_MEM.search(seg)
    if m:
        return LogRecord(i, "memory", seg, _mem_fields(m["body"]))
    m = P_TIME.search(seg)
    if m:
        return LogRecord(i, "step_time", seg, {"step": int(m[1]), "dt": float(m[2])})
    return LogRecord(i, "lvsa_other", seg, {})


def _context_records(i: int, seg: str, state: Dict[str, Any]) -> Iterable[LogRecord]:
    m = P_EXPORT.search(seg)
    if m:
        yield LogRecord(i, "export", seg, {"path": m["path"].strip(), "secs": float(m["secs"]) if m["secs"] else None})
    m = P_DECODE_OOM.search(seg)
    if m:
        state["decode_oom_cmd"] = True
        yield LogRecord(i, "decode_oom", seg, {"cmd": m["cmd"], "latent": m["latent"]})
    m = P_LVSA_DECODE_CMD.search(seg)
    if m:
        yield LogRecord(i, "decode_hint", seg, {"latent": m["latent"], "output": m["output"]})
    m = P_CONTAINER_WARN.search(seg)
    if m:
        yield LogRecord(i, "container_warning", seg, {"why": m["why"], "flag": m["flag"], "path": m["path"]})
    elif P_CONTAINER.search(seg):
        binds = [(b["src"], b["dst"]) for b in P_BIND.finditer(seg)]
        w = P_WORKDIR.search(seg)
        yield LogRecord(i, "container", seg, {"binds": binds, "workdir": w["dir"] if w else None})
    if P_TRACEBACK.search(seg):
        yield LogRecord(i, "traceback", seg, {})
    m = P_FRAME.search(seg)
    if m:
        yield LogRecord(i, "frame", seg, {"file": m["file"], "line": int(m["line"]), "func": m["func"]})
    if P_OOM.search(seg) and not P_LVSA_ANY.search(seg):
        yield LogRecord(i, "oom", seg, {})
    m = None
    for m in P_PROGRESS.finditer(seg):
        pass
    if m is not None:
        yield LogRecord(i, "progress", seg, {"desc": (m["desc"] or "").strip(), "n": int(m["n"]),
                                             "total": int(m["total"]), "pct": int(m["pct"])})
    m = P_VLLM_BACKEND.search(seg)
    if m:
        yield LogRecord(i, "vllm_backend", seg, {"backend": (m["backend"] or m["default"]).upper(),
                                                 "defaulted": m["default"] is not None})
    elif P_VLLM.search(seg):
        yield LogRecord(i, "vllm", seg, {})
    m = P_ATTN_CONFIG.search(seg)
    if m:
        yield LogRecord(i, "attention_config", seg, {"value": (m["value"] or m["dotted"] or "").strip("'\"")})
    if P_SERVE_WRAPPER.search(seg):
        yield LogRecord(i, "serve_wrapper", seg, {})
    for m in P_ENV.finditer(seg):
        yield LogRecord(i, "env", seg, {"name": m["name"], "value": m["value"].strip("'\"")})
    for fam, preset, pat in _FAMILY_PATTERNS:
        if pat.search(seg):
            yield LogRecord(i, "model", seg, {"family": fam, "preset": preset})
            break
    for m in P_METRIC.finditer(seg):
        yield LogRecord(i, "metric", seg, {"metric": m["metric"].lower(), "value": float(m["value"])})
    m = P_GEN_DONE.search(seg)
    if m:
        state["summary"] = True
        yield LogRecord(i, "generate_done", seg, {"cmd": m["cmd"]})
    elif state.get("summary"):
        m = P_GEN_SUMMARY.search(seg)
        if m:
            f: Dict[str, Any] = {"key": m["key"], "value": m["value"]}
            f.update({k: v for k, v in parse_fields(m["value"]).items() if k in ("T_lat", "P")})
            yield LogRecord(i, "generate_summary", seg, f)
        else:
            state["summary"] = False
    for m in P_CLI_LVSA.finditer(seg):
        yield LogRecord(i, "cli_flag", seg, {"flag": m["flag"]})
    yield from _version_records(i, seg, state)
    if P_LOGLEVEL.search(seg):
        yield LogRecord(i, "loglevel", seg, {})


def _version_records(i: int, seg: str, state: Dict[str, Any]) -> Iterable[LogRecord]:
    """``version`` records (``package`` ``vllm-omni`` or ``vllm``, ``version``)."""
    m = P_OMNI_VERSION.search(seg) or P_OMNI_LIST_ROW.search(seg)
    if m:
        yield LogRecord(i, "version", seg, {"package": "vllm-omni", "version": m["v"]})
    else:
        m = P_VLLM_VERSION.search(seg)
        if m:
            yield LogRecord(i, "version", seg, {"package": "vllm", "version": m["v"] or m["eq"]})
    m = P_PIP_SHOW_NAME.search(seg)
    if m:  # `pip show`: the version is on a later line of the same block
        state["pip_show"] = "vllm-omni" if "omni" in m["name"].lower() else "vllm"
        return
    m = P_PIP_SHOW_VERSION.search(seg)
    if m and state.get("pip_show"):
        yield LogRecord(i, "version", seg, {"package": state.pop("pip_show"), "version": m["v"]})


def read_input(data: bytes, source: str = "-") -> List[str]:
    """Bytes → lines, or :class:`UnreadableInput` for empty or binary input."""
    if not data or not data.strip():
        raise UnreadableInput(f"{source}: the input is empty (nothing to diagnose); pass the log of a run, "
                              "e.g. `python run.py 2>&1 | tee run.log; lvsa doctor run.log`")
    if b"\x00" in data[:65536]:
        raise UnreadableInput(f"{source}: this is binary data (NUL bytes), not a text log")
    text = data.decode("utf-8", errors="replace")
    sample = text[:65536]
    bad = sum(1 for c in sample if c == "\ufffd" or (ord(c) < 32 and c not in "\n\r\t\x1b"))
    if bad > max(8, len(sample) // 20):
        raise UnreadableInput(f"{source}: this does not decode as text ({bad} undecodable or control "
                              f"characters in the first {len(sample)}), not a run log")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # terminal colours and cursor moves
    return text.split("\n")


def parse_log(data: bytes, source: str = "-") -> ParsedLog:
    """Parse a run log. Raises :class:`UnreadableInput` for empty, binary or unrelated input."""
    lines = read_input(data, source)
    if lines and lines[-1] == "":
        lines = lines[:-1]
    records: List[LogRecord] = []
    state: Dict[str, Any] = {}
    for i, line in enumerate(lines, 1):
        # a progress bar redrawn with \r: every state is on this line; lvsa lines may follow it
        for seg in line.split("\r"):
            if not seg.strip():
                continue
            m = P_LVSA_ANY.search(seg)
            if m:  # a progress bar without a newline may precede the lvsa line
                lv = seg[m.start():].strip()
                records.append(LogRecord(i, "lvsa_line", lv, {}))
                records.append(_lvsa_record(i, lv))
                seg = seg[:m.start()]
                if not seg.strip():
                    continue
            records.extend(_context_records(i, seg, state))
    # keep only the last state of a progress bar per line
    last_bar = {r.lineno: id(r) for r in records if r.kind == "progress"}
    out = [r for r in records if r.kind != "progress" or last_bar[r.lineno] == id(r)]
    log = ParsedLog(source, lines, out)
    if not log.looks_like_a_log():
        raise UnreadableInput(
            f"{source}: nothing in these {len(lines)} lines looks like the log of a video generation run "
            "(no [LVSA] lines, progress bar, traceback, [export] line, vllm-omni or LVSA_* lines). "
            "If it is one, lvsa was not in its attention path: enable it (`lvsa.enable(pipe)`, "
            "`lvsa generate`, or for vllm-omni `--diffusion-attention-config "
            "'{\"per_role\":{\"self\":{\"backend\":\"LVSA\"}}}'`) and capture stdout and stderr "
            "(`2>&1 | tee run.log`)")
    return log
