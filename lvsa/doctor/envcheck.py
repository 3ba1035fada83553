"""``lvsa doctor --env``: the live environment and installation.

Checks every ``LVSA_*`` variable on its own (so one bad value does not hide the next),
variables that contradict each other or do nothing, the reference horizon for the model
you name, the backends that cannot run and why (the same reasons ``lvsa info`` gives:
:func:`lvsa.commands.info.gather_info` is called, not re-implemented), and torch_npu.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from ..config import Config, unknown_variables
from ..presets import ALIASES, PRESETS, get_preset
from . import versions
from .findings import REFERENCE_HELP, Diagnosis, Finding, broken_backends, refusal_fixes

GUIDE = ""


def _f(id, severity, symptom, evidence, cause, fix) -> Finding:
    return Finding(id, severity, symptom, [(None, e) for e in evidence], cause, fix, GUIDE)


def check_variables(env: Mapping[str, str]) -> Tuple[List[Finding], Dict[str, Any], List[str]]:
    """Each variable parsed on its own. Returns findings, parsed values by field, bad variable names."""
    out: List[Finding] = []
    by_env = Config.fields_by_env()
    values: Dict[str, Any] = {}
    bad: List[str] = []
    for var, f in by_env.items():
        if var not in env:
            continue
        try:
            values[f.name] = f.metadata["parse"](var, env[var])
        except ValueError as e:
            bad.append(var)
            out.append(_f("env-invalid", "problem", f"{var} does not parse", [f"{var}={env[var]}"], str(e),
                          [f"export {var}=<{f.metadata['doc']}>   # default {f.default!r}", f"unset {var}"]))
    raw = env.get("LVSA_CONFIG")
    if raw is not None and raw.strip():
        try:
            Config.load(env={"LVSA_CONFIG": raw})
            obj = json.loads(raw)
            names = {fl.name: fl for fl in by_env.values()}
            for key, val in obj.items():
                fl = names.get(key) or by_env.get(key)
                if fl is not None and fl.name in values and values[fl.name] != fl.metadata["parse"](key, val):
                    out.append(_f("env-overridden", "note", f"LVSA_CONFIG overrides {fl.metadata['env']}",
                                  [f"{fl.metadata['env']}={env[fl.metadata['env']]}", f"LVSA_CONFIG={raw}"],
                                  f"LVSA_CONFIG[{key!r}] = {val!r} wins over {fl.metadata['env']}="
                                  f"{env[fl.metadata['env']]}: the variable has no effect.",
                                  [f"unset {fl.metadata['env']}   # or remove {key!r} from LVSA_CONFIG"]))
                if fl is not None:
                    values[fl.name] = fl.metadata["parse"](key, val)
        except ValueError as e:
            bad.append("LVSA_CONFIG")
            out.append(_f("env-invalid", "problem", "LVSA_CONFIG does not parse", [f"LVSA_CONFIG={raw}"], str(e),
                          ["export LVSA_CONFIG='{\"window_size\": 16, \"sparsity_scale\": 0.8}'   # a JSON object",
                           "unset LVSA_CONFIG"]))
    settings = _declared_settings()
    for st in settings:  # variables backends and plugins declare (LVSA_TRITON_CONFIG, ...)
        if st.env in env:
            try:
                st.read(env)
            except ValueError as e:
                bad.append(st.env)
                out.append(_f("env-invalid", "problem", f"{st.env} does not parse", [f"{st.env}={env[st.env]}"],
                              str(e), [f"unset {st.env}   # {st.owner or 'plugin'}: {st.doc}"]))
    for var, close in unknown_variables(env, settings).items():
        out.append(_f("env-unknown", "problem" if close else "note", f"{var} is not an lvsa variable",
                      [f"{var}={env[var]}"],
                      "lvsa does not read it" + (f"; did you mean {close}?" if close else
                                                 " (lvsa info --vars lists every variable)."),
                      [f"export {close}={env[var]}; unset {var}"] if close else ["lvsa info --vars"]))
    return out, values, bad


def _declared_settings() -> list:
    try:
        from .. import plugins
        return plugins.declared_settings()
    except Exception:  # noqa: BLE001 - a broken registry is reported by check_installation
        return []


def check_contradictions(env: Mapping[str, str], bad: List[str]) -> List[Finding]:
    """Variables that contradict each other or do nothing (``bad``: those that do not parse, left out)."""
    out: List[Finding] = []
    # the deprecated schedule variables are checked below; loading them would print lvsa's own warning
    good = {k: v for k, v in env.items() if k not in bad and not k.startswith("LVSA_SCHEDULE_")}
    try:
        cfg = Config.load(env={k: v for k, v in good.items() if k.startswith("LVSA_")})
    except (ValueError, TypeError):
        return out
    ev = lambda *names: [f"{n}={env[n]}" for n in names if n in env]  # noqa: E731
    if cfg.patches_per_frame and (cfg.video_height or cfg.video_width):
        try:
            derived = Config.load(env={k: v for k, v in good.items() if k.startswith("LVSA_")
                                       and k != "LVSA_PATCHES_PER_FRAME"}).candidate_ppf()
        except ValueError:
            derived = ()
        if derived and derived[0] not in cfg.patches_per_frame:
            out.append(_f("env-contradiction", "problem",
                          "LVSA_PATCHES_PER_FRAME contradicts LVSA_VIDEO_HEIGHT/LVSA_VIDEO_WIDTH",
                          ev("LVSA_PATCHES_PER_FRAME", "LVSA_VIDEO_HEIGHT", "LVSA_VIDEO_WIDTH",
                             "LVSA_VAE_SPATIAL_FACTOR", "LVSA_PATCH_SIZE"),
                          f"the resolution gives P={derived[0]}, but LVSA_PATCHES_PER_FRAME="
                          f"{','.join(map(str, cfg.patches_per_frame))} wins, so the resolution is ignored.",
                          ["unset LVSA_PATCHES_PER_FRAME   # use the resolution", f"# or: export LVSA_PATCHES_PER_FRAME={derived[0]}"]))
    else:
        try:
            cfg.candidate_ppf()
        except ValueError as e:
            out.append(_f("env-contradiction", "problem", "the resolution variables do not give a P",
                          ev("LVSA_VIDEO_HEIGHT", "LVSA_VIDEO_WIDTH", "LVSA_VAE_SPATIAL_FACTOR", "LVSA_PATCH_SIZE"),
                          str(e), ["export LVSA_VIDEO_HEIGHT=480 LVSA_VIDEO_WIDTH=832   # both, multiples of "
                                   "VAE spatial factor x patch size"]))
    if cfg.is_set("key_frame_interval") and cfg.auto_keyframes:
        out.append(_f("env-ignored", "note", "LVSA_KEY_FRAME_INTERVAL is ignored while LVSA_AUTO_KEYFRAMES=1",
                      ev("LVSA_KEY_FRAME_INTERVAL", "LVSA_AUTO_KEYFRAMES"),
                      "the automatic keyframe interval (from the reference horizon) is on; a fixed interval "
                      "applies only with LVSA_AUTO_KEYFRAMES=0.",
                      ["export LVSA_AUTO_KEYFRAMES=0   # to use the fixed interval", "unset LVSA_KEY_FRAME_INTERVAL"]))
    if cfg.window_size and not cfg.latent_window():
        out.append(_f("env-contradiction", "problem", "LVSA_WINDOW_SIZE is below one latent frame: no local window",
                      ev("LVSA_WINDOW_SIZE", "LVSA_VAE_TEMPORAL_FACTOR"),
                      f"window {cfg.window_size} video frames // VAE temporal factor {cfg.vae_temporal_factor} = 0 "
                      "latent frames: every frame sees only the global frames.",
                      [f"export LVSA_WINDOW_SIZE={max(12, cfg.vae_temporal_factor)}   # 12 = W 3 (default)"]))
    dep = [n for n in ("LVSA_SCHEDULE_START", "LVSA_SCHEDULE_END") if n in env and n not in bad
           and float(env[n]) != 0.0]
    if dep:
        out.append(_f("deprecated-schedule", "problem", "deprecated LVSA_SCHEDULE_* variables are set: they change nothing",
                      ev(*dep), "LVSA_SCHEDULE_START/END are soft-deprecated and have no effect; the runtime knob is "
                      "LVSA_SPARSITY_SCALE (< 1 sparser).",
                      ["unset LVSA_SCHEDULE_START LVSA_SCHEDULE_END", "export LVSA_SPARSITY_SCALE=0.8   # sparser"]))
    if cfg.is_set("warn_fallback") and not cfg.warn_fallback:
        out.append(_f("env-fallbacks-hidden", "note", "LVSA_WARN_FALLBACK=0 hides every fallback line",
                      ev("LVSA_WARN_FALLBACK"), "a run that falls back to dense will not say so in its log, and "
                      "`lvsa doctor run.log` cannot see it.", ["unset LVSA_WARN_FALLBACK   # while diagnosing"]))
    if cfg.is_set("total_latent_frames"):
        out.append(_f("env-fixed-frames", "note", "LVSA_TOTAL_LATENT_FRAMES fixes T for every generation",
                      ev("LVSA_TOTAL_LATENT_FRAMES"), "a generation with another frame count falls back "
                      "(reason=no_t_lat or geometry_detect); lvsa's diffusers integration takes T from the call.",
                      ["unset LVSA_TOTAL_LATENT_FRAMES   # unless the integration cannot know T"]))
    return out


def check_reference(values: Dict[str, Any], model: Optional[str]) -> List[Finding]:
    ref = values.get("reference_latent_frames")
    if model is None:
        if ref is None:
            return [_f("reference-unset", "note", "LVSA_REFERENCE_LATENT_FRAMES is not set", [],
                       "lvsa uses the family's training horizon in its diffusers integration, but a server "
                       "or script that serves several models, and the published implementation, need it set. "
                       "Pass --model to check a value against a model.",
                       ["export LVSA_REFERENCE_LATENT_FRAMES=<21|31|33|13>   # " + REFERENCE_HELP])]
        return []
    preset = get_preset(model)
    exp = preset.reference_latent_frames
    if ref is None:
        return [_f("reference-unset", "note", f"LVSA_REFERENCE_LATENT_FRAMES is not set for {preset.name}", [],
                   f"{preset.name} was trained at {exp} latent frames; lvsa's diffusers integration finds it, "
                   "other paths (vllm-omni, scripts) may use another default. Set it explicitly.",
                   [f"export LVSA_REFERENCE_LATENT_FRAMES={exp}"])]
    if ref != exp:
        return [_f("reference-mismatch", "problem", f"LVSA_REFERENCE_LATENT_FRAMES={ref} does not match {preset.name}",
                   [f"LVSA_REFERENCE_LATENT_FRAMES={ref}"],
                   f"{preset.name} was trained at {exp} latent frames ({(exp - 1) * 4 + 1} video frames); with {ref} "
                   "the sparsity budget is wrong (at the training length the run is not exact).",
                   [f"export LVSA_REFERENCE_LATENT_FRAMES={exp}"])]
    return []


def check_vllm_omni(env: Mapping[str, str], installed: Optional[Callable[[], Optional[str]]] = None) -> List[Finding]:
    """The installed vllm-omni decides which plugin serves LVSA, and whether ``LVSA_WAN_HOOK`` matters:
    the published plugin of vllm-omni 0.22 needs it for Wan, lvsa-vllm-omni (0.30) reads ``video_layout``."""
    found = (installed or versions.installed_vllm_omni)()
    v = versions.VllmOmniVersion(found, "installed in this environment") if found else versions.VllmOmniVersion()
    hook = env.get("LVSA_WAN_HOOK")
    if v.reads_video_layout and hook is not None:
        return [_f("wan-hook-unused", "note", "LVSA_WAN_HOOK is set, but the installed vllm-omni does not need it",
                   [f"LVSA_WAN_HOOK={hook}", f"vllm-omni {found}"],
                   f"{v.describe()}: LVSA is served by lvsa-vllm-omni, which reads Wan's latent grid from "
                   "vllm-omni's video_layout and does not read LVSA_WAN_HOOK (the published vllm-omni 0.22 plugin "
                   "did; lvsa accepts the variable for compatibility).",
                   ["unset LVSA_WAN_HOOK   # optional: it changes nothing here"])]
    if v.reads_video_layout is False:
        hook_on = hook is not None and hook.strip().lower() in ("1", "true", "yes", "on")
        fix = [f"pip install 'vllm-omni>=0.30,<0.31'   # lvsa-vllm-omni ({'.'.join(map(str, versions.PLUGIN_VLLM_OMNI))})"]
        if not hook_on:
            fix += ["# or, staying on the published vllm-omni 0.22 plugin, for Wan:", "export LVSA_WAN_HOOK=1"]
        return [_f("vllm-omni-before-plugin", "note", f"vllm-omni {found} is installed: lvsa-vllm-omni does not serve it",
                   [f"vllm-omni {found}"] + ([f"LVSA_WAN_HOOK={hook}"] if hook is not None else []),
                   f"{v.describe()}: lvsa-vllm-omni is written for vllm-omni 0.30 and stays unregistered (one "
                   "reason=vllm_omni_version line); LVSA there is the published plugin, which for Wan needs "
                   "LVSA_WAN_HOOK=1 (without it Wan's _sp_plan pre-shards the sequence"
                   + ("; it is set)." if hook_on else ")."), fix)]
    return []


@contextlib.contextmanager
def _without(names: List[str]) -> Iterator[None]:
    """Run ``lvsa info``'s gathering with the unparseable variables out of the way (restored after)."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def check_installation(env: Mapping[str, str], bad: List[str], info: Optional[Dict[str, Any]] = None) -> List[Finding]:
    out: List[Finding] = []
    if info is None:
        from ..commands.info import gather_info
        with _without(bad):
            info = gather_info()
    npu = info.get("npu", {})
    if npu.get("installed") and not npu.get("importable"):
        out.append(_f("torch-npu-broken", "problem", "torch_npu is installed but does not import",
                      [f"torch_npu: {npu.get('reason')}"], npu.get("reason") or "",
                      ["source /usr/local/Ascend/ascend-toolkit/set_env.sh   # the CANN environment",
                       "python -c \"import torch, torch_npu; print(torch.__version__, torch_npu.__version__)\"",
                       "pip install 'torch-npu==<the release matching your torch>'"]))
    elif npu.get("installed") and not npu.get("available"):
        out.append(_f("npu-not-visible", "note", "torch_npu imports but no NPU is usable", [f"torch_npu: {npu.get('reason')}"],
                      npu.get("reason") or "", ["npu-smi info", "echo $ASCEND_RT_VISIBLE_DEVICES"]))
    clash = info.get("name_clash")
    if clash:
        out.append(_f("backend-name-clash", "problem", f"two distributions register the backend {clash['backend']!r}",
                      [clash["message"]], clash["message"],
                      [f"pip uninstall {d}   # keep one" for d in clash["distributions"][1:]] + ["lvsa info"]))
    rows = {b["name"]: b for b in info.get("backends", [])}
    wanted = env.get("LVSA_BACKEND", "auto").strip() if "LVSA_BACKEND" not in bad else "auto"
    if wanted and wanted != "auto":
        if wanted not in rows:
            out.append(_f("backend-unknown", "problem", f"LVSA_BACKEND={wanted} is not a registered backend",
                          [f"LVSA_BACKEND={wanted}"], f"registered: {', '.join(sorted(rows)) or 'none'}; "
                          "a backend from another distribution needs it installed (and listed in LVSA_LOAD_PLUGINS "
                          "when that is set).", ["lvsa info", "unset LVSA_BACKEND   # automatic choice"]))
        elif rows[wanted]["reasons"]:
            out.append(_f("backend-cannot-run", "problem", f"LVSA_BACKEND={wanted} cannot run here",
                          [f"{wanted}: {r}" for r in rows[wanted]["reasons"]],
                          f"an explicitly chosen backend that cannot run raises (for the typical problem "
                          f"{info.get('problem')}).", ["lvsa info", "unset LVSA_BACKEND   # automatic choice"]))
    kind = info.get("problem", "cpu").split()[0]
    if kind != "cpu" and info.get("auto_selects") == "reference":
        out.append(_f("slow-backend", "problem", f"no fast backend can run on {kind}: auto selects the reference",
                      [f"{n}: {'; '.join(b['reasons'])}" for n, b in rows.items() if b["reasons"]],
                      "the reference backend is correct but not faster than dense attention.",
                      ["lvsa info"] + refusal_fixes({n: b["reasons"] for n, b in rows.items() if b["reasons"]},
                                                    kind)))
    for name, text in broken_backends({n: b["reasons"] for n, b in rows.items()}).items():
        out.append(_f("backend-broken", "problem", f"the {name} backend is installed but does not import",
                      [f"{name}: {text}"], f"auto never picks {name} until its package imports; it selects "
                      f"{info.get('auto_selects')} now.", refusal_fixes({name: text}, kind) + ["lvsa info"]))
    if info.get("selection_error"):
        out.append(_f("backend-selection", "problem", "no backend can be selected", [info["selection_error"]],
                      info["selection_error"], ["lvsa info"]))
    unavailable = [(n, b) for n, b in rows.items() if b["reasons"] and n != wanted]
    if unavailable:
        out.append(_f("backends-unavailable", "note",
                      f"{len(unavailable)} of {len(rows)} backends cannot run here (as `lvsa info` reports)",
                      [f"{n}: {'; '.join(b['reasons'])}" for n, b in unavailable],
                      f"for the typical problem {info.get('problem')}; auto selects {info.get('auto_selects')}.",
                      ["lvsa info"]))
    for p in info.get("plugins", []):
        if p.get("status") == "failed":
            out.append(_f("plugin-failed", "problem", f"plugin {p.get('name')} failed to load",
                          [f"{p.get('name')} from {p.get('distribution')} {p.get('version')}: {p.get('error')}"],
                          str(p.get("error")), [f"pip install --force-reinstall {p.get('distribution')}", "lvsa info"]))
    return out


def check_environment(env: Optional[Mapping[str, str]] = None, model: Optional[str] = None,
                      info: Optional[Dict[str, Any]] = None,
                      installed_vllm_omni: Optional[Callable[[], Optional[str]]] = None) -> Diagnosis:
    """Diagnose the live environment (``env`` defaults to ``os.environ``; ``installed_vllm_omni``
    returns the installed vllm-omni's version, default: its distribution metadata)."""
    env = dict(os.environ if env is None else env)
    if model is not None:
        get_preset(model)  # unknown names: ValueError with the list
    findings, values, bad = check_variables(env)
    findings += check_contradictions(env, bad)
    findings += check_reference(values, model)
    findings += check_installation(env, bad, info)
    findings += check_vllm_omni(env, installed_vllm_omni)
    findings.sort(key=lambda f: f.severity != "problem")
    facts = {"variables": {k: v for k, v in sorted(env.items()) if k.startswith("LVSA_")},
             "model": model and get_preset(model).name}
    return Diagnosis("--env", findings, facts)


__all__ = ["check_environment", "check_variables", "check_contradictions", "check_reference",
           "check_installation", "check_vllm_omni", "ALIASES", "PRESETS"]
