"""Findings: one small rule per failure mode of the troubleshooting guide.

Each rule has an ``id``, the guide's symptom it covers, and ``check(log, ctx)`` returning
:class:`Finding` objects: the symptom in one sentence, the evidence lines (with line
numbers), the cause, and the fix as commands a user can paste. A rule may *claim* the
records it explains so that later, more generic rules do not report them twice (one
finding per problem).

``severity``: ``problem`` (something is wrong: exit code 1) or ``note`` (worth knowing,
not wrong: a dense run at the reference horizon, warm-up fallbacks, quality trade-offs).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ..presets import FAMILY_REFERENCE, PRESETS
from ..schedule import plan_schedule
from . import fit, versions
from .logparse import LogRecord, ParsedLog
from .versions import VllmOmniVersion

PER_ROLE_CONFIG = '\'{"per_role":{"self":{"backend":"LVSA"}}}\''
FAMILY_NAMES = {"wan": "Wan 2.x", "hunyuan": "HunyuanVideo 1.5", "cogvideox": "CogVideoX"}
REFERENCE_HELP = "LVSA_REFERENCE_LATENT_FRAMES: 21 Wan 2.1/2.2 T2V, 31 Wan 2.2 TI2V-5B, 33 HunyuanVideo 1.5, 13 CogVideoX"
WARMUP_RATIO = 0.75  # a fallback this much shorter than the generation's sequence, before it, is warm-up


@dataclass
class Finding:
    id: str
    severity: str                       # "problem" | "note"
    symptom: str
    evidence: List[Tuple[Optional[int], str]]
    cause: str
    fix: List[str]                      # commands; lines starting with '#' explain the next ones
    guide: str = ""                     # the troubleshooting guide's symptom it matches

    def as_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "symptom": self.symptom,
                "evidence": [{"line": n, "text": t} for n, t in self.evidence],
                "cause": self.cause, "fix": list(self.fix), "guide": self.guide}


def ev(*records: Optional[LogRecord]) -> List[Tuple[Optional[int], str]]:
    seen, out = set(), []
    for r in records:
        if r is not None and (r.lineno, r.text) not in seen:
            seen.add((r.lineno, r.text))
            out.append((r.lineno, r.text.strip()))
    return sorted(out, key=lambda e: e[0] or 0)


# ------------------------------------------------------------------ context
@dataclass
class Context:
    """Facts several rules need, computed once per log."""

    log: ParsedLog
    family: Optional[str] = None
    preset: Optional[str] = None
    family_record: Optional[LogRecord] = None
    generation_seq_len: Optional[int] = None
    generation_fallbacks: List[LogRecord] = field(default_factory=list)
    warmup_fallbacks: List[LogRecord] = field(default_factory=list)
    claimed: Set[int] = field(default_factory=set)   # id() of records a rule explained
    silenced: bool = False                            # fallbacks counted but not printed
    #: the installed vllm-omni's version (a lookup; None: :func:`versions.installed_vllm_omni`)
    installed_vllm_omni: Optional[Callable[[], Optional[str]]] = None
    _vllm_omni: Optional[VllmOmniVersion] = None

    def claim(self, *records: LogRecord) -> None:
        self.claimed.update(id(r) for r in records)

    def unclaimed(self, records: Sequence[LogRecord]) -> List[LogRecord]:
        return [r for r in records if id(r) not in self.claimed]

    @property
    def reference(self) -> Optional[int]:
        return PRESETS[self.preset].reference_latent_frames if self.preset in PRESETS else (
            FAMILY_REFERENCE.get(self.family) if self.family else None)

    def env_value(self, name: str) -> Optional[str]:
        r = self.log.env().get(name)
        return None if r is None else r.fields["value"]

    def vllm_omni(self) -> VllmOmniVersion:
        """The vllm-omni version of the run (log first, then this environment), looked up once."""
        if self._vllm_omni is None:
            self._vllm_omni = versions.vllm_omni_version(
                self.log, self.installed_vllm_omni or versions.installed_vllm_omni)
        return self._vllm_omni


def build_context(log: ParsedLog, installed_vllm_omni: Optional[Callable[[], Optional[str]]] = None) -> Context:
    ctx = Context(log, installed_vllm_omni=installed_vllm_omni)
    fam = log.family()
    if fam:
        ctx.family, ctx.preset, ctx.family_record = fam
    engaged = log.of("engaged")
    fallbacks = [r for r in log.of("fallback") if isinstance(r.get("seq_len"), int) and r.get("seq_len") > 0]
    lens = [r.get("seq_len") for r in engaged + fallbacks if isinstance(r.get("seq_len"), int)]
    if lens:
        ctx.generation_seq_len = max(lens)
        first_gen = min(r.lineno for r in engaged + fallbacks if r.get("seq_len") == ctx.generation_seq_len)
        for r in fallbacks:
            n = r.get("seq_len")
            if n <= WARMUP_RATIO * ctx.generation_seq_len and r.lineno < first_gen:
                ctx.warmup_fallbacks.append(r)
            else:
                ctx.generation_fallbacks.append(r)
    ctx.generation_fallbacks += [r for r in log.of("fallback") if r not in fallbacks]  # seq_len 0: pipeline level
    ctx.generation_fallbacks.sort(key=lambda r: r.lineno)
    return ctx


# ------------------------------------------------------------------ rules
class Rule:
    id = ""
    guide = ""

    def check(self, log: ParsedLog, ctx: Context) -> List[Finding]:
        raise NotImplementedError

    def finding(self, severity, symptom, evidence, cause, fix, id=None) -> Finding:
        return Finding(id or self.id, severity, symptom, evidence, cause, fix, self.guide)


def _vllm_fix(ctx: Context) -> List[str]:
    ref = ctx.reference
    fix = [f"vllm serve MODEL --omni --diffusion-attention-config {PER_ROLE_CONFIG}",
           "# or let the wrapper add it (it prints the command it runs):",
           "python -m lvsa_vllm_omni.serve MODEL",
           f"export LVSA_AUTO_KEYFRAMES=1 LVSA_REFERENCE_LATENT_FRAMES={ref if ref else '<21|33|13>'}"]
    if ctx.family in (None, "wan"):
        fix += wan_hook_fix(ctx.vllm_omni(), "Wan: without it Wan's _sp_plan pre-shards the sequence")
    return fix


def wan_hook_fix(v: VllmOmniVersion, why: str, layout_note: bool = False) -> List[str]:
    """The troubleshooting guide's Wan advice (``LVSA_WAN_HOOK=1``) where it applies: the
    published plugin of vllm-omni before 0.30. lvsa-vllm-omni (vllm-omni 0.30) reads Wan's
    latent grid from ``video_layout``: nothing to set (a comment with ``layout_note``).
    An unknown version gets both cases."""
    if v.reads_video_layout:
        return [f"# Wan: {v.describe()} runs lvsa-vllm-omni, which reads Wan's latent grid from "
                "video_layout (LVSA_WAN_HOOK is not needed)"] if layout_note else []
    if v.reads_video_layout is False:
        return [f"export LVSA_WAN_HOOK=1   # {why}"]
    return [f"export LVSA_WAN_HOOK=1   # vllm-omni 0.22 plugin, {why}",
            "#   (vllm-omni 0.30 with lvsa-vllm-omni reads Wan's latent grid from video_layout: no LVSA_WAN_HOOK)"]


class SilencedFallbacks(Rule):
    """``lvsa generate``'s summary counts fallbacks that printed no line (``LVSA_WARN_FALLBACK=0``)."""

    id = "fallbacks-silenced"
    guide = "Symptom 1 (silent fallback)"

    def check(self, log, ctx):
        if log.of("fallback"):
            return []
        for r in log.of("generate_summary"):
            m = re.search(r"fallbacks=(\d+)(?: \(([^)]*)\))?", r.get("value", "")) if r.get("key") == "lvsa" else None
            if not (m and int(m.group(1)) > 0):
                continue
            ctx.silenced = True
            reasons = m.group(2) or "reason not shown"
            fix = ["unset LVSA_WARN_FALLBACK   # run again: the [LVSA-FALLBACK] lines name seq_len and the reason",
                   "lvsa doctor run.log       # then this doctor can compute the fix"]
            P = [p for _, p in _P_seen(log)]
            if "geometry_detect" in reasons and P:
                fix.insert(0, f"export LVSA_PATCHES_PER_FRAME={P[0]}   # the P this pipeline reported")
            return [self.finding(
                "problem", f"lvsa fell back {m.group(1)} times ({reasons}) but printed no fallback line",
                ev(log.env().get("LVSA_WARN_FALLBACK"), r),
                "fallback lines were silenced (LVSA_WARN_FALLBACK=0), so the log does not show which sequence "
                "lengths failed; lvsa's summary shows those calls ran dense instead of sparse.", fix)]
        return []


class NoLvsaLines(Rule):
    """No ``[LVSA]`` line at all: lvsa was not in the attention path (or nothing reached it)."""

    id = "no-lvsa-lines"
    guide = "Symptom 1 (no [LVSA] lines: backend not selected)"

    def check(self, log, ctx):
        if log.lvsa_lines:
            if not log.of("engaged", "schedule", "fallback") and log.of("progress", "export"):
                return [self.finding(
                    "problem", "lvsa printed lines but never engaged or fell back: no attention call reached it",
                    ev(*log.lvsa_lines[:3]),
                    "lvsa was loaded (its plugin/selection lines are there) but no self-attention call went "
                    "through it, so the run was plain dense attention.",
                    ["# diffusers: enable lvsa on the pipeline you call, after any processor changes",
                     "python -c \"import lvsa; lvsa.enable(pipe)\"   # in your script, before pipe(...)",
                     "lvsa generate --model DIR ...                  # or the CLI (no --no-lvsa)"],
                    id="lvsa-not-engaged")]
            return []
        if ctx.silenced:
            return []
        summary_off = next((r for r in log.of("generate_summary") if "--no-lvsa" in r.text), None)
        flag_off = next((r for r in log.of("cli_flag") if r.get("flag") == "no-lvsa"), None)
        if summary_off or flag_off:
            return [self.finding(
                "note", "no [LVSA] lines: this is a dense baseline run (--no-lvsa)", ev(summary_off, flag_off),
                "--no-lvsa runs the pipeline without lvsa on purpose (the dense baseline).",
                ["lvsa generate ...   # the same command without --no-lvsa runs with lvsa"], id="dense-baseline")]
        if log.is_vllm_omni:
            return [self._vllm(log, ctx)]
        evidence = ev(*(log.of("progress")[-1:] + log.of("export")[:1] + log.of("cli_flag")[:1]
                        + log.of("traceback")[:1]))
        return [self.finding(
            "problem", "no [LVSA] lines at all: lvsa was not used in this run", evidence,
            "lvsa prints '[LVSA] engaged ...' (or a '[LVSA-FALLBACK]' line) to stderr in every generation it "
            "takes part in. None is here: the backend was not selected (lvsa.enable() not called, or the "
            "example script's --lvsa flag missing), or stderr was not captured.",
            ["# diffusers / Python: enable lvsa on the pipeline before calling it",
             "python -c \"import lvsa; print(lvsa.__version__)\"   # lvsa importable in this environment?",
             "#   in your script:  import lvsa; lvsa.enable(pipe); pipe(...)",
             "# the lvsa CLI (enabled unless --no-lvsa):",
             "lvsa generate --model DIR --num-frames 161 2>&1 | tee run.log",
             "# the published example scripts: pass --lvsa",
             "python examples/hunyuan_generate.py --model DIR --lvsa --auto-keyframes 2>&1 | tee run.log",
             "# for vllm-omni see: lvsa doctor on a server log; capture stderr too (2>&1)"])]

    def _vllm(self, log, ctx):
        chosen = log.of("vllm_backend")
        configs = log.of("attention_config")
        legacy = [r for r in log.of("env") if r.get("name") == "DIFFUSION_ATTENTION_BACKEND"]
        wrapper = log.of("serve_wrapper")
        lvsa_chosen = [r for r in chosen if r.get("backend") == "LVSA"]
        if lvsa_chosen:
            cause = ("vllm-omni reports the LVSA backend selected, but no [LVSA] line followed: the lvsa "
                     "plugin prints to stderr, which this log does not hold (or no request ran).")
            fix = ["vllm serve MODEL --omni ... 2>&1 | tee server.log   # capture stderr with stdout",
                   "lvsa doctor server.log"]
        else:
            parts = ["vllm-omni did not route self-attention to lvsa"]
            if chosen:
                parts.append(f"it used {', '.join(sorted({r.get('backend') for r in chosen}))}")
            if configs and not any("LVSA" in (r.get("value") or "").upper() for r in configs):
                parts.append("the --diffusion-attention-config given does not name LVSA for the \"self\" role")
            if legacy:
                parts.append("DIFFUSION_ATTENTION_BACKEND is not how lvsa is selected since vllm-omni 0.22: "
                             "the per-role attention config is")
            if not configs and not wrapper:
                parts.append("no per-role attention config was passed and the lvsa_vllm_omni.serve wrapper "
                             "(which injects it) was not used")
            cause = "; ".join(parts) + "."
            fix = _vllm_fix(ctx)
        return self.finding("problem", "no [LVSA] lines in a vllm-omni log: the LVSA backend was not selected",
                            ev(*(chosen[:2] + configs[:2] + legacy[:1] + wrapper[:1])) or ev(log.of("vllm")[0]),
                            cause, fix, id="vllm-backend-not-selected")


def _fallback_text(r: LogRecord) -> str:
    return f"reason={r.get('reason')} seq_len={r.get('seq_len')}"


class WarmupFallbacks(Rule):
    """Fallback lines of the warm-up request: shorter sequences before the generation's."""

    id = "warmup-fallbacks"
    guide = "Symptom 1 (fallback lines: warm-up vs generation)"

    def check(self, log, ctx):
        if not ctx.warmup_fallbacks:
            return []
        ctx.claim(*ctx.warmup_fallbacks)
        lens = sorted({r.get("seq_len") for r in ctx.warmup_fallbacks})
        return [self.finding(
            "note", f"{len(ctx.warmup_fallbacks)} fallback line(s) from a warm-up, not from the generation",
            ev(*ctx.warmup_fallbacks),
            f"their seq_len ({', '.join(map(str, lens))}) is far below the generation's {ctx.generation_seq_len} "
            "and they come before it: a warm-up/dummy request with a small shape that lvsa runs dense. "
            "They cost nothing in the real generation.",
            ["# nothing to do; to hide them: export LVSA_WARN_FALLBACK=0 (hides every fallback line)"])]


class WanHookMissing(Rule):
    """Wan under vllm-omni fell back for its geometry: before vllm-omni 0.30, no ``LVSA_WAN_HOOK=1``
    (a pre-sharded sequence); with lvsa-vllm-omni (0.30), a missing or foreign ``video_layout``."""

    id = "wan-hook-missing"
    guide = "Symptom 1 (for Wan: LVSA_WAN_HOOK=1)"

    def check(self, log, ctx):
        if not (log.is_vllm_omni and ctx.family == "wan"):
            return []
        v = ctx.vllm_omni()
        hook = ctx.env_value("LVSA_WAN_HOOK")
        if not v.reads_video_layout and hook is not None and hook.strip().lower() in ("1", "true", "yes", "on"):
            return []
        fbs = [r for r in ctx.unclaimed(ctx.generation_fallbacks)
               if r.get("reason") in ("geometry_detect", "no_t_lat", "no_geometry")]
        if not fbs:
            return []
        ctx.claim(*fbs)
        hook_rec = log.env().get("LVSA_WAN_HOOK")
        notes = []
        for r in fbs:
            known = _known_ppf(r) or [1560]
            n = r.get("seq_len")
            whole = [P for P in known if isinstance(n, int) and n > 0 and n % P == 0]
            fits = fit.fits(r.get("seq_len"), known, "wan", limit=1)
            if whole:
                notes.append(f"seq_len={r.get('seq_len')} is {r.get('seq_len') // whole[0]} whole frames of "
                             f"P={whole[0]}, but lvsa was not told the latent frame count")
            elif fits and fits[0].shard > 1:
                notes.append(f"seq_len={r.get('seq_len')} is exactly 1/{fits[0].shard} of {fits[0].describe()}")
        serve = f"vllm serve MODEL --omni --diffusion-attention-config {PER_ROLE_CONFIG}"
        keyframes = f"export LVSA_AUTO_KEYFRAMES=1 LVSA_REFERENCE_LATENT_FRAMES={ctx.reference or 21}"
        if v.reads_video_layout:
            return [self._video_layout(v, fbs, hook_rec, ctx, notes, serve, keyframes)]
        cause = ("this is Wan served by vllm-omni without LVSA_WAN_HOOK=1. The hook gives lvsa the latent "
                 "frame count and the whole sequence; without it Wan's _sp_plan shards the sequence across the "
                 "sequence-parallel ranks before attention, so lvsa sees a piece of the video (or no frame "
                 "count) and cannot find whole frames: every layer ran dense.")
        if notes:
            cause += " " + "; ".join(notes) + "."
        fix = ["export LVSA_WAN_HOOK=1", keyframes, serve]
        if v.reads_video_layout is False:
            cause += (f" The run used {v.describe()}: before 0.30 LVSA is the published plugin, written for "
                      "vllm-omni 0.22, which reads LVSA_WAN_HOOK; lvsa-vllm-omni needs vllm-omni 0.30 and reads "
                      "Wan's latent grid from video_layout.")
        else:
            cause += (" The vllm-omni version is not in the log: LVSA_WAN_HOOK=1 is the fix for the published "
                      "vllm-omni 0.22 plugin; lvsa-vllm-omni (vllm-omni 0.30) reads Wan's latent grid from "
                      "video_layout and does not read it.")
            fix += ["# vllm-omni 0.30 with lvsa-vllm-omni needs no hook; which one served this run:",
                    "pip show vllm-omni lvsa-vllm-omni"]
        return [self.finding(
            "problem", "Wan under vllm-omni fell back to dense during generation (sequence pre-sharded)",
            ev(*fbs, hook_rec, ctx.family_record, v.record), cause, fix)]

    def _video_layout(self, v, fbs, hook_rec, ctx, notes, serve, keyframes) -> Finding:
        reasons = ", ".join(sorted({str(r.get("reason")) for r in fbs}))
        cause = (f"{v.describe()}: lvsa-vllm-omni serves it and takes Wan's latent grid from the attention "
                 "metadata's video_layout, which vllm-omni 0.30's Wan transformer publishes on every "
                 "self-attention call, with the whole sequence (Ulysses gathers it before the backend). "
                 f"These fallbacks ({reasons}) mean the layout was missing or did not cover the sequence: a "
                 "vllm-omni build whose Wan publishes no video_layout, or an lvsa-vllm-omni from another lvsa. "
                 "LVSA_WAN_HOOK belongs to the published vllm-omni 0.22 plugin and changes nothing here.")
        if notes:
            cause += " " + "; ".join(notes) + "."
        fix = ["pip show vllm-omni lvsa-vllm-omni   # vllm-omni 0.30.x; lvsa-vllm-omni from this lvsa",
               "pip install 'vllm-omni>=0.30,<0.31'",
               "pip install -U lvsa-vllm-omni", keyframes, serve]
        if hook_rec is not None:
            fix.append("unset LVSA_WAN_HOOK   # not read by lvsa-vllm-omni (harmless)")
        return Finding("wan-video-layout", "problem",
                       "Wan under vllm-omni 0.30 fell back to dense during generation (no usable video_layout)",
                       ev(*fbs, hook_rec, ctx.family_record, v.record), cause, fix,
                       "Symptom 1 (its LVSA_WAN_HOOK=1 is for the vllm-omni 0.22 plugin)")


def _known_ppf(r: LogRecord) -> List[int]:
    k = r.get("known_ppf")
    if isinstance(k, int):
        return [k]
    return [int(x) for x in k] if isinstance(k, (list, tuple)) else []


def _texts_seen(log: ParsedLog) -> List[int]:
    out = []
    for r in log.of("engaged"):
        try:
            t = int(r.get("seq_len")) - int(r.get("T_lat")) * int(r.get("P"))
        except (TypeError, ValueError):
            continue
        if t >= 0 and t not in out:
            out.append(t)
    return out


def _P_seen(log: ParsedLog) -> List[Tuple[Optional[int], int]]:
    """``(T, P)`` the pipeline reported (``lvsa generate``'s summary, engaged lines)."""
    out: List[Tuple[Optional[int], int]] = []
    for r in log.of("generate_summary", "engaged"):
        p, t = r.get("P"), r.get("T_lat")
        if isinstance(p, int) and p > 0:
            key = (t if isinstance(t, int) else None, p)
            if key not in out:
                out.append(key)
    return out


class GeometryDetect(Rule):
    """``reason=geometry_detect`` during generation, with the arithmetic of what would fit."""

    id = "geometry-detect"
    guide = "Symptom 1 (reason=geometry_detect: non-default resolution)"

    def check(self, log, ctx):
        out = []
        for r in ctx.unclaimed([r for r in ctx.generation_fallbacks if r.get("reason") == "geometry_detect"]):
            ctx.claim(r)
            seq_len = r.get("seq_len")
            known = _known_ppf(r)
            fits = fit.fits(seq_len, known, ctx.family, _texts_seen(log), _P_seen(log), r.get("expected_T"),
                            sharded_possible=log.is_vllm_omni or ctx.family in (None, "wan"))
            known_s = ",".join(map(str, known)) or "?"
            cause = (f"no known tokens-per-frame value P ({known_s}) divides the sequence of {seq_len} tokens"
                     + (f" into the {r.get('expected_T')} latent frames expected" if r.get("expected_T") else "")
                     + ", so lvsa could not tell frames apart and ran dense attention on every layer. ")
            if fits:
                best = fits[0]
                cause += f"What fits: {best.describe()}"
                if len(fits) > 1 and "reported" not in best.source:
                    cause += "; also possible: " + "; ".join(f.describe() for f in fits[1:3])
                cause += "."
                if best.shard > 1:
                    fix = ["# the P was right: the sequence reaching lvsa is a sequence-parallel shard"]
                    if log.is_vllm_omni:
                        fix += wan_hook_fix(ctx.vllm_omni(), "vllm-omni Wan: attention sees the whole sequence",
                                            layout_note=True)
                    else:
                        fix.append("export LVSA_WAN_HOOK=1   # vllm-omni Wan: attention sees the whole sequence")
                    fix.append("# or run without sequence parallelism (one GPU per request)")
                else:
                    fix = [f"export {' '.join(best.env())}"]
                    res = best.resolution_env()
                    if res:
                        fix += ["# or, equivalently, from the resolution (LVSA_PATCHES_PER_FRAME must be unset: it wins)",
                                f"unset LVSA_PATCHES_PER_FRAME; export {' '.join(res)}"]
                    if best.text and ctx.family != "hunyuan":
                        fix.append(f"# the sequence also holds {best.text} text tokens (joint attention)")
                    alt = [f for f in fits[1:3] if f.shard == 1 and f.P != best.P and "reported" not in best.source]
                    for f in alt:
                        fix.append(f"# if your video is {f.height}x{f.width}: export LVSA_PATCHES_PER_FRAME={f.P}"
                                   if f.height else f"# or: export LVSA_PATCHES_PER_FRAME={f.P}")
            else:
                grids = fit.divisor_grids(seq_len)
                cause += ("No common resolution of the known models fits it" +
                          (": possible T x P splits: " + ", ".join(f"{T} x {P}" for T, P in grids) if grids else "")
                          + ".")
                fix = ["# P = (height / VAE spatial factor / patch) * (width / VAE spatial factor / patch)",
                       "export LVSA_PATCHES_PER_FRAME=<P for your resolution>",
                       "# or: export LVSA_VIDEO_HEIGHT=<H> LVSA_VIDEO_WIDTH=<W> (and LVSA_VAE_SPATIAL_FACTOR / "
                       "LVSA_PATCH_SIZE if not 8 / 2)"]
            out.append(self.finding(
                "problem", f"lvsa fell back to dense during generation: reason=geometry_detect seq_len={seq_len}",
                ev(r), cause, fix))
        return out


class NoTLat(Rule):
    """``reason=no_t_lat``: the latent frame count could not be established."""

    id = "no-t-lat"
    guide = "Symptom 1 (reason=no_t_lat)"

    def check(self, log, ctx):
        out = []
        for r in ctx.unclaimed([r for r in ctx.generation_fallbacks if r.get("reason") == "no_t_lat"]):
            ctx.claim(r)
            seq_len, total = r.get("seq_len"), r.get("total_latent_frames")
            video = r.get("video_len")
            video = video if isinstance(video, int) else seq_len
            env_rec = log.env().get("LVSA_TOTAL_LATENT_FRAMES")
            if isinstance(total, int):
                cands = [f for f in fit.fits(video, _known_ppf(r), ctx.family, [0], _P_seen(log)) if f.shard == 1]
                cause = (f"LVSA_TOTAL_LATENT_FRAMES={total} does not divide the {video} video tokens of this "
                         "sequence, so lvsa could not trust its frame count and ran dense.")
                fix = ["unset LVSA_TOTAL_LATENT_FRAMES   # lvsa takes T from the pipeline call"]
                if cands:
                    cause += f" The sequence fits {cands[0].describe()}."
                    fix.append(f"# or set it to the real latent frame count: export LVSA_TOTAL_LATENT_FRAMES={cands[0].T}")
            elif isinstance(r.get("text_len"), int):
                cause = (f"the sequence ({seq_len} tokens) holds no video tokens after its {r.get('text_len')} "
                         "text tokens: an attention call lvsa cannot plan (text-only, or a wrong text length).")
                fix = ["# report it with the model name and this log: lvsa info --json > info.json"]
            else:
                cands = [f for f in fit.fits(seq_len, _known_ppf(r), ctx.family, _texts_seen(log), _P_seen(log))
                         if f.shard == 1]
                cause = ("the number of latent frames T was not known for this sequence (the integration got no "
                         "frame count), so lvsa ran dense.")
                fix = ["export LVSA_TOTAL_LATENT_FRAMES=<latent frames = (num_frames - 1) / 4 + 1>"]
                if cands:
                    cause += f" The sequence fits {cands[0].describe()}."
                    fix = [f"export LVSA_TOTAL_LATENT_FRAMES={cands[0].T} LVSA_PATCHES_PER_FRAME={cands[0].P}"]
            out.append(self.finding(
                "problem", f"lvsa fell back to dense during generation: reason=no_t_lat seq_len={seq_len}",
                ev(r, env_rec), cause, fix))
        return out


#: causes and fixes of the other fallback reasons lvsa (and its vllm-omni plugin) log
OTHER_REASONS: Dict[str, Tuple[str, List[str]]] = {
    "backend_error": ("the backend {backend} raised {error}; lvsa demoted it for this problem and ran the "
                      "reference backend (correct, slower).",
                      ["lvsa info                      # which backends can run here, and why not",
                       "LVSA_STRICT=1 <your command>   # re-raise instead of falling back, for the full traceback",
                       "export LVSA_BACKEND=reference  # or pick a backend that works, until it is fixed"]),
    "context_parallel": ("the transformer runs with a diffusers context-parallel mode lvsa does not split "
                         "exactly (ring, or *_anything); lvsa handed those calls to the original processor "
                         "(dense). Ulysses (diffusers' ulysses_degree, or lvsa's own) stays sparse.",
                         ["# let lvsa split the sequence itself (exact, sparse on every rank):",
                          "torchrun --nproc-per-node N -m lvsa generate ... --context-parallel auto",
                          "# or in Python: lvsa.enable(pipe, context_parallel='auto'), or diffusers'",
                          "#   ContextParallelConfig(ulysses_degree=N) instead of ring_degree"]),
    "attention_mask": ("the call carried an explicit attention mask, which the sparse path does not model; it "
                       "ran through the model's own (dense) processor.",
                       ["# expected for masked calls; if every call has a mask, report it with the model name"]),
    "cross_attention": ("the self-attention processor was called with encoder states (image/text context), "
                        "which lvsa leaves to the model's processor (dense).",
                        ["# expected for image-to-video context; report it if text-to-video shows it"]),
    "no_text_stream": ("HunyuanVideo 1.5 attention was called without its text stream or mask; lvsa handed "
                       "it to the original processor (dense).",
                       ["# report it with the diffusers version: pip show diffusers"]),
    "processors_replaced": ("the attention processors were replaced after lvsa.enable() ({now}), so lvsa was "
                            "out of the attention path.",
                            ["# call lvsa.enable(pipe) again after fuse_qkv_projections() / set_attn_processor()"]),
    "lvsa_not_called": ("lvsa was enabled on the pipeline but no attention call reached it during the "
                        "generation (another processor or a compiled graph ran instead).",
                        ["# enable lvsa after every processor change and before torch.compile:",
                         "#   lvsa.enable(pipe); pipe.transformer = torch.compile(pipe.transformer)"]),
    "no_geometry": ("the vllm-omni plugin got no latent grid or step for this model, so it ran dense.",
                    ["pip install -U lvsa-vllm-omni   # geometry is published for Wan and HunyuanVideo 1.5",
                     f"vllm serve MODEL --omni --diffusion-attention-config {PER_ROLE_CONFIG}"]),
    "ring_parallel": ("vllm-omni's ring sequence parallelism never calls an attention backend, so the LVSA "
                      "layers ran vllm-omni's dense ring kernel.",
                      ["# use Ulysses sequence parallelism instead of ring (each rank then sees the whole",
                       "# sequence for its heads and lvsa stays sparse): set the ulysses degree, not the ring degree"]),
    "kv_length_mismatch": ("the keys were longer or shorter than the queries (vllm-omni's all-gather-KV "
                           "sequence parallelism), which the LVSA plugin runs dense.",
                           ["# use Ulysses sequence parallelism for the LVSA layers"]),
    "causal": ("a causal attention call reached the LVSA backend; lvsa's mask is bidirectional, so it ran "
               "dense.", ["# expected only for models that are not video diffusion transformers"]),
    "unsupported_metadata": ("vllm-omni passed attention metadata the LVSA plugin does not model ({field}); "
                             "it ran dense.",
                             ["pip show vllm-omni lvsa-vllm-omni   # report it with both versions"]),
    "vllm_omni_version": ("the installed vllm-omni version is not one the lvsa plugin supports; it stayed out "
                          "of the way (dense).",
                          ["pip install 'vllm-omni>=0.30,<0.31'", "pip show vllm-omni lvsa-vllm-omni"]),
}


class OtherFallbacks(Rule):
    """Every other fallback during generation (one finding per reason)."""

    id = "fallback"
    guide = "Symptom 1 (silent fallback)"

    def check(self, log, ctx):
        by_reason: Dict[str, List[LogRecord]] = {}
        for r in ctx.unclaimed(ctx.generation_fallbacks):
            by_reason.setdefault(str(r.get("reason")), []).append(r)
        out = []
        for reason, recs in by_reason.items():
            ctx.claim(*recs)
            f = dict(recs[0].fields)
            cause_t, fix = OTHER_REASONS.get(reason, (
                "lvsa handed these calls to dense attention for a reason this doctor does not know "
                f"({reason}); the line's fields say more.", ["lvsa info", "# report it with this log"]))
            f.setdefault("backend", "?")
            f.setdefault("error", "an error")
            f.setdefault("now", "another processor")
            try:
                cause = cause_t.format(**f)
            except (KeyError, IndexError, ValueError):
                cause = cause_t
            out.append(self.finding("problem", f"lvsa fell back to dense during generation: reason={reason}",
                                    ev(*recs), cause, fix, id=f"fallback-{reason.replace('_', '-')}"))
        return out


class DenseByDesign(Rule):
    """Engaged, but ``-> DENSE (T_lat <= ref)``: correct at or below the reference horizon."""

    id = "dense-by-design"
    guide = "Symptom 1 (no speedup) / Symptom 5 (sparsity_scale)"

    def check(self, log, ctx):
        engaged = log.of("engaged")
        if not engaged or any(not r.get("dense") for r in engaged):
            return []
        r = engaged[-1]
        T, W = r.get("T_lat"), r.get("W")
        sched = next((s for s in reversed(log.of("schedule")) if s.get("T") == T), None)
        ref = sched.get("reference") if sched else (ctx.reference or None)
        fix = [f"# longer videos run sparse: more than {ref} latent frames = more than {(ref - 1) * 4 + 1} video frames"
               if ref else "# longer videos (past the reference horizon) run sparse"]
        detail = ""
        if isinstance(T, int) and isinstance(ref, int):
            n = 1
            w = W if isinstance(W, int) else 3
            for scale in (0.9, 0.8, 0.75, 0.7, 0.6, 0.5):
                s = plan_schedule(T, w, n, ref, scale)
                if not s.dense:
                    sp = s.mask_for_step(0).sparsity()
                    detail = (f" With LVSA_SPARSITY_SCALE={scale:g} the budget becomes floor({ref}*{scale:g}) = "
                              f"{int(ref * scale)} < {T}: kfi={s.key_frame_interval}, sparsity {sp:.2f} at this "
                              "length, at some cost in quality.")
                    fix.append(f"export LVSA_SPARSITY_SCALE={scale:g}   # sparse at this length "
                               f"(kfi={s.key_frame_interval}, sparsity {sp:.2f}); quality trade-off")
                    break
        return [self.finding(
            "note", "lvsa engaged but ran DENSE (T_lat <= ref): no speedup expected at this length",
            ev(r, sched),
            f"T_lat={T} is at or below the reference horizon ({ref} latent frames, the model's training "
            "length): the schedule keeps every frame global (kfi=1), i.e. exact dense attention, by design. "
            "lvsa speeds up generation past the training horizon." + detail, fix)]


def _in_decode(frames: List[LogRecord], log: ParsedLog) -> Optional[LogRecord]:
    for fr in reversed(frames):
        code = log.line(fr.lineno + 1)
        blob = (fr.get("func", "") + " " + fr.get("file", "") + " " + code).lower()
        if any(k in blob for k in ("vae", "decode", "autoencoder", "decoder")):
            return fr
    return None


class DecodeOOM(Rule):
    """Out of memory in the VAE decode after the denoising loop finished."""

    id = "decode-oom"
    guide = "Symptom 2 (OOM at long sequences: VAE decode)"

    def check(self, log, ctx):
        lvsa_msg = log.of("decode_oom")
        if lvsa_msg:
            m = lvsa_msg[-1]
            hint = next((h for h in log.of("decode_hint") if h.lineno > m.lineno), None)
            latent = m.get("latent")
            cmd = hint.text.strip() if hint else f"lvsa decode {latent}"
            return [self.finding(
                "problem", "the VAE decode ran out of memory after denoising finished; the latent was kept",
                ev(*(log.of("progress")[-1:]), m, hint),
                "denoising completed (lvsa kept attention memory bounded), then decoding every latent frame at "
                f"once ran out of device memory. lvsa saved the denoised latent first: {latent}.",
                [cmd + "   # VAE tiling on; on this or a larger device",
                 "# next time skip the decode in the run and decode separately:",
                 "lvsa generate ... --output-latent outputs/long.pt && lvsa decode outputs/long.pt"])]
        ooms = log.of("oom")
        if not ooms:
            return []
        oom = ooms[-1]
        tb = [t for t in log.of("traceback") if t.lineno <= oom.lineno]
        start = tb[-1].lineno if tb else max(1, oom.lineno - 60)
        frames = [f for f in log.of("frame") if start <= f.lineno <= oom.lineno]
        progress = [p for p in log.of("progress") if p.lineno <= oom.lineno]
        done = [p for p in progress if p.get("total") and p.get("n") == p.get("total")]
        decode_frame = _in_decode(frames, log)
        if decode_frame is not None and (done or not progress):
            return [self.finding(
                "problem", "out of memory in the VAE decode after the denoising loop completed",
                ev(*(done[-1:]), tb[-1] if tb else None, decode_frame, oom),
                "the attention forward completed (denoising reached its last step); the VAE then decoded "
                "all latent frames at once and ran out of memory. Attention is not the problem.",
                ["# save the denoised latent instead of decoding in the run, then decode it separately:",
                 "lvsa generate --model DIR --num-frames F ... --output-latent outputs/long.pt",
                 "lvsa decode outputs/long.pt            # VAE tiling on; on this or a larger device",
                 "# the published example scripts: add --output-latent",
                 "# vllm-omni / diffusers Python API: call with output_type=\"latent\", save the tensor, then:",
                 "#   torch.save({\"latent\": out.frames, \"num_frames\": F}, \"long.pt\")"])]
        return [self.finding(
            "problem", "out of memory during denoising (not in the VAE decode)", id="oom-denoising", evidence=
            ev(*(progress[-1:]), tb[-1] if tb else None, *(frames[-2:]), oom),
            cause="the run ran out of device memory before the denoising loop finished. "
            + ("lvsa did not engage (no engaged line), so attention ran dense. "
               if not log.of("engaged") else
               "lvsa was engaged; memory goes to weights and activations as well as attention. "),
            fix=["lvsa plan --model MODEL --num-frames F   # the sparsity this length gets",
             "# fewer frames or a lower resolution per GPU, CPU offload of idle components:",
             "#   pipe.enable_model_cpu_offload()",
             "nvidia-smi --query-gpu=memory.used,memory.total --format=csv   # or npu-smi info"])]


def _container_bind(log: ParsedLog) -> List[str]:
    dsts = []
    for r in log.of("container"):
        dsts += [d for _, d in r.get("binds", [])]
        if r.get("workdir"):
            dsts.append(r.get("workdir"))
    return [d.rstrip("/") or "/" for d in dsts]


class ExportHostPath(Rule):
    """An ``[export]`` line with an absolute host path in a container log."""

    id = "export-host-path"
    guide = "Symptom 3 (output mp4 missing after a Docker run)"

    def check(self, log, ctx):
        if not log.is_container:
            return []
        binds = _container_bind(log)
        warn = log.of("container_warning")
        out_recs = []
        for r in log.of("export"):
            p = r.get("path")
            if not p.startswith("/"):
                continue
            if any(p == b or p.startswith(b + "/") for b in binds if b != "/"):
                continue
            out_recs.append(r)
        warned = [w for w in warn if w.get("path") and not any(w.get("path") == r.get("path") for r in out_recs)]
        if not out_recs and not warned:
            return []
        recs = out_recs or warned
        p = recs[0].get("path")
        base = os.path.basename(p)
        flag = next((w.get("flag") for w in warn if w.get("path") == p), "--output")
        return [self.finding(
            "problem", f"output written to an absolute path inside a container: {p}",
            ev(*(log.of("container")[:1]), *warn[:1], *recs),
            "an absolute path given to the container names the container's own file system, not the host's: "
            "outside a bind mount the file stays in the container and is lost with `docker run --rm` "
            "(the host path does not exist in there).",
            ["# relative path under a bind-mounted working directory:",
             f"docker run --rm -v $(pwd):/workdir/code -w /workdir/code IMAGE lvsa generate ... {flag} outputs/{base}",
             "#   (the published scripts: --output-name benchmarks/results/" + base + ")",
             "# files are written as root: make them yours on the host",
             "chown -R $(id -u):$(id -g) outputs"])]


class ReferenceMismatch(Rule):
    """The schedule's reference horizon is not the model's training length."""

    id = "reference-mismatch"
    guide = "Symptom 4 (quality regression at training reference)"

    def check(self, log, ctx):
        warns = [w for w in log.of("warning") if "trained at" in w.get("message", "")
                 and "reference_latent_frames" in w.get("message", "")]
        ctx.claim(*warns)
        out = []
        for s in log.of("schedule"):
            R, T, ratio = s.get("reference"), s.get("T"), s.get("extension_ratio")
            expected, who = ctx.reference, FAMILY_NAMES.get(ctx.family or "", "")
            if ctx.preset == "wan2.2-ti2v-5b":
                who = "Wan 2.2 TI2V-5B"
            guessed = False
            if expected is None:
                # no family in the log: the frame count itself may be a known training length
                by_ref = {p.reference_latent_frames: p for p in PRESETS.values()}
                if T in by_ref and T != R and ratio > 1.0 and R in by_ref:
                    expected, who, guessed = T, FAMILY_NAMES[by_ref[T].family], True
            if expected is None or R == expected:
                continue
            if any(o.evidence[0][1] == s.text.strip() for o in out):
                continue
            wrong = next((FAMILY_NAMES[p.family] for p in PRESETS.values() if p.reference_latent_frames == R), None)
            cause = (f"the schedule used reference_latent_frames={R}"
                     + (f" ({wrong}'s default)" if wrong and wrong != who else "")
                     + f", but {who} was trained at {expected} latent frames ({(expected - 1) * 4 + 1} video frames). ")
            if T == expected:
                cause += (f"At the training length the extension ratio must be 1.00x (dense, exact); it is "
                          f"{ratio:.2f}x, so the run skipped attention it should have kept.")
            else:
                cause += "The sparsity budget is computed from the wrong horizon."
            if guessed:
                cause += f" (Model inferred from T={T}, {who}'s training length; no model name in the log.)"
            out.append(self.finding(
                "problem", f"reference horizon {R} does not match the model ({who}: {expected})",
                ev(s, *warns, ctx.family_record if not guessed else None), cause,
                [f"export LVSA_REFERENCE_LATENT_FRAMES={expected}   # {who}",
                 "# " + REFERENCE_HELP + ": always set it explicitly"]))
        if not out and warns:
            w = warns[0]
            out.append(self.finding("problem", "lvsa warned that the reference horizon does not match the model",
                                    ev(w), w.get("message"), ["# " + REFERENCE_HELP]))
        return out


class DeprecatedSchedule(Rule):
    """``LVSA_SCHEDULE_START``/``END`` set to non-zero: deprecated, no effect."""

    id = "deprecated-schedule"
    guide = "Symptom 7 (LVSA_SCHEDULE_* do nothing)"

    def check(self, log, ctx):
        recs = [w for w in log.of("warning") if "LVSA_SCHEDULE_" in w.get("message", "")]
        ctx.claim(*recs)
        for name in ("LVSA_SCHEDULE_START", "LVSA_SCHEDULE_END"):
            r = log.env().get(name)
            if r is not None:
                try:
                    nonzero = float(r.get("value")) != 0.0
                except ValueError:
                    nonzero = True
                if nonzero:
                    recs.append(r)
        if not recs:
            return []
        return [self.finding(
            "problem", "deprecated LVSA_SCHEDULE_* variables are set: they change nothing",
            ev(*recs),
            "LVSA_SCHEDULE_START and LVSA_SCHEDULE_END are soft-deprecated and have no effect on the schedule; "
            "the runtime knob is LVSA_SPARSITY_SCALE (< 1 sparser, > 1 denser).",
            ["unset LVSA_SCHEDULE_START LVSA_SCHEDULE_END",
             "export LVSA_SPARSITY_SCALE=0.8   # for a sparser (faster) run; 1.0 is the default"])]


class MotionQuality(Rule):
    """Quality metrics in the log: the documented sparse-attention trade-offs."""

    id = "motion-quality"
    guide = "Symptoms 5 and 6 (dynamic_quality drop, loop_quality gain)"

    def check(self, log, ctx):
        recs = log.of("metric")
        if not recs:
            return []
        metrics = sorted({r.get("metric") for r in recs})
        text = ("motion-related quality scores ({}) are in this log. A drop in dynamic_quality (~5 points) or "
                "motion_smoothness (~0.02) on motion-heavy prompts is the documented trade-off of sparse "
                "attention: long-range pairs that carry large-scale motion are skipped. A large loop_quality gain "
                "is real and comes from the rotating keyframes breaking dense's looping failure; report it with "
                "dense's baseline.").format(", ".join(metrics))
        return [self.finding(
            "note", "quality metrics present: motion-quality trade-offs and what to turn", ev(*recs[:6]), text,
            ["export LVSA_WINDOW_SIZE=16      # W=4 latent frames: more long-range mixing, ~10% more time",
             "export LVSA_SPARSITY_SCALE=1.0  # the default; at T_lat <= reference the run is dense (exact)",
             "export LVSA_SPARSITY_SCALE=1.2  # a larger budget: denser past the horizon, slower",
             "lvsa generate ... --no-lvsa     # dense for motion-heavy prompts",
             "lvsa plan --model MODEL --num-frames F --window-size 16   # see what a setting changes"])]


#: the package a refusal reason names after ``pip install`` (``'lvsa-cuda[fa4]'``, ``lvsa-cuda``)
_PIP_PACKAGE = re.compile(r"pip install '?([A-Za-z0-9_.\-]+(?:\[[A-Za-z0-9_,\-]+\])?)'?")
#: a whole ``pip install ...`` command in a reason (up to the next comma, semicolon or bracket)
_PIP_COMMAND = re.compile(r"pip install [^,;()']+[^,;()' ]")
#: the module of "X fails to import" / "X is installed but fails to import"
_BROKEN_MODULE = re.compile(r"([\w.]+) (?:is installed but )?fails to import")


def refusal_fixes(refused, device: str) -> List[str]:
    """Commands for the refusal reasons the backends give (``not_supported_reasons``).

    ``refused``: backend name -> its reasons (a string, or a list of strings); a plain
    string is one backend's reasons without its name. A missing package gets the install
    command its own reason names (fa4: ``lvsa-cuda[fa4]``; flashinfer:
    ``lvsa-cuda[flashinfer]``), a package that is installed but does not import gets the
    command that shows its error (and the reinstall the reason names)."""
    if isinstance(refused, str):
        refused = {"": refused}
    fix: List[str] = []

    def add(line: str) -> None:
        if line not in fix:
            fix.append(line)

    texts = []
    for name, why in refused.items():
        text = why if isinstance(why, str) else ", ".join(why)
        texts.append(text)
        tag = f"   # {name}" if name else ""
        low = text.lower()
        if "autograd is recording" in low:  # installing or fixing it would not help under autograd
            add("# autograd was recording (q/k/v require grad): wrap inference in torch.no_grad() or "
                "torch.inference_mode() and the fast kernels run; training through attention runs on "
                "the reference")
            continue
        if "not installed" in low:
            m = _PIP_PACKAGE.search(text)
            if m:
                add(f"pip install '{m.group(1)}'{tag}")
            else:
                add("pip install lvsa-ascend   # Ascend NPUs" if device.startswith("npu") else
                    "pip install 'lvsa-cuda[flashinfer]'   # NVIDIA: triton and flashinfer")
        if "fails to import" in low:
            mod = _BROKEN_MODULE.search(text)
            add(f"python -c 'import {mod.group(1) if mod else name}'   # {name or 'the backend'} is "
                "installed but does not import: this shows the whole error")
            cmd = _PIP_COMMAND.search(text)
            if cmd:
                add(cmd.group(0) + tag)
    low = " ".join(texts).lower()
    if "dtype" in low:
        add("lvsa generate ... --dtype bfloat16   # the fast kernels take bfloat16/float16 "
            "(Python: pipe.to(torch.bfloat16))")
    if "head_dim" in low:
        add("# the model's attention head size is not one the fast kernels take (see the allowed "
            "values above); the reference backend is the path for it")
    if "compute capability" in low or "sm_" in low:
        add("# this GPU generation is not one every kernel was built for (the reasons above name it); "
            "the backends that accept it, else the reference backend, are the path")
    return fix


def broken_backends(refused) -> Dict[str, str]:
    """The backends among ``refused`` (name -> reasons) whose package is installed but
    does not import: a broken install, never picked until it is fixed."""
    out = {}
    for name, why in refused.items():
        text = why if isinstance(why, str) else ", ".join(why)
        if "fails to import" in text.lower():
            out[name] = text
    return out


class SlowBackend(Rule):
    """Automatic selection fell to the reference backend on a GPU/NPU, a backend is installed
    but does not import, or a plugin failed to load."""

    id = "slow-backend"
    guide = "Symptom 1 (no speedup)"

    def check(self, log, ctx):
        out = []
        broken: Set[str] = set()
        for r in log.of("selection"):
            dev = r.get("device", "")
            refused = r.get("refused") or {}
            if all("raised at run time" in v for v in refused.values()):
                continue  # a demotion after a backend error: the backend_error finding explains it
            if r.get("backend") == "reference" and not dev.startswith("cpu"):
                reasons = "; ".join(f"{k}: {v}" for k, v in refused.items())
                out.append(self.finding(
                    "problem", f"no fast backend on {dev}: lvsa ran its reference backend", ev(r),
                    f"every faster backend refused this problem ({reasons}). The reference backend is correct "
                    "but not faster than dense attention.", ["lvsa info   # every backend and why it cannot run"]
                    + refusal_fixes(refused, dev)))
            for name, text in broken_backends(refused).items():
                if name in broken:
                    continue
                broken.add(name)
                out.append(self.finding(
                    "problem", f"the {name} backend is installed but does not import: auto never picks it",
                    ev(r), f"{name}: {text}. lvsa ran {r.get('backend')} instead.",
                    refusal_fixes({name: text}, dev) + ["lvsa info   # the backend's state after the fix"],
                    id="backend-broken"))
        for r in log.of("plugin_error"):
            out.append(self.finding(
                "problem", "an lvsa plugin failed to load and was skipped", ev(r), r.get("message"),
                ["lvsa info   # plugin status and errors", "pip check"], id="plugin-failed"))
        return out


class LvsaWarnings(Rule):
    """Any other ``[LVSA] WARNING`` line: lvsa says what is wrong and what to do itself."""

    id = "lvsa-warning"
    guide = ""

    def check(self, log, ctx):
        out = []
        for w in ctx.unclaimed(log.of("warning")):
            ctx.claim(w)
            msg = w.get("message", "")
            hint = msg.split("; ", 1)[1] if "; " in msg else ""
            out.append(self.finding("problem", "lvsa warned: " + msg.split(";")[0].split(":")[0], ev(w), msg,
                                    [f"# {hint}" if hint else "# see the warning's text above"]))
        return out


#: every rule, in the order they claim evidence
RULES: Tuple[Rule, ...] = (SilencedFallbacks(), NoLvsaLines(), WarmupFallbacks(), WanHookMissing(), GeometryDetect(), NoTLat(),
                           OtherFallbacks(), DenseByDesign(), DecodeOOM(), ExportHostPath(), ReferenceMismatch(),
                           DeprecatedSchedule(), SlowBackend(), MotionQuality(), LvsaWarnings())


@dataclass
class Diagnosis:
    source: str
    findings: List[Finding]
    facts: Dict[str, Any]

    @property
    def problems(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "problem"]

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "healthy": self.healthy, "facts": self.facts,
                "findings": [f.as_dict() for f in self.findings]}


def _facts(log: ParsedLog, ctx: Context) -> Dict[str, Any]:
    engaged = log.of("engaged")
    return {
        "lines": len(log.lines), "lvsa_lines": len(log.lvsa_lines),
        "family": ctx.family, "vllm_omni": log.is_vllm_omni, "container": log.is_container,
        "generations": [{"line": r.lineno, "T_lat": r.get("T_lat"), "P": r.get("P"), "seq_len": r.get("seq_len"),
                         "mode": r.get("mode")} for r in engaged],
        "generation_seq_len": ctx.generation_seq_len,
        "fallbacks": {"generation": len(ctx.generation_fallbacks), "warmup": len(ctx.warmup_fallbacks)},
    }


def diagnose(log: ParsedLog, installed_vllm_omni: Optional[Callable[[], Optional[str]]] = None) -> Diagnosis:
    """Run every rule over a parsed log. ``installed_vllm_omni`` returns the vllm-omni version
    installed here (default: the distribution's metadata), used when the log names none."""
    ctx = build_context(log, installed_vllm_omni)
    findings: List[Finding] = []
    for rule in RULES:
        try:
            findings.extend(rule.check(log, ctx))
        except Exception as e:  # noqa: BLE001 - one rule's bug must not hide the other findings
            findings.append(Finding(
                "doctor-rule-error", "note", f"the doctor's rule {rule.id!r} failed on this log", [],
                f"{type(e).__name__}: {e}. The other rules ran; please report this with the log.",
                ["lvsa doctor LOG --json > doctor.json   # attach it and the log to the report"]))
    findings.sort(key=lambda f: f.severity != "problem")  # problems first, stable otherwise
    return Diagnosis(log.source, findings, _facts(log, ctx))
