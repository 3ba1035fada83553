"""``lvsa generate``: a video from a diffusers pipeline with lvsa in its self-attention.

The flow (:func:`run_generate`): check every input before anything heavy or anything
written (:func:`prepare`) → load the pipeline and enable lvsa (:func:`load`) → denoise with
a progress bar (:func:`denoise`) → save the latent atomically *before* the VAE decode (no
lost work: Symptom 2) → decode to an mp4 → print a summary.

Exit codes: 0 done; 2 bad input (one message, nothing written); 3 the VAE decode ran out
of memory (the latent is kept and the message says how to decode it); 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from . import _video as V  # ImportError without the diffusers extra

_GENERATE_DESCRIPTION = """\
Generate a video with a diffusers pipeline, lvsa in its self-attention.

With no arguments this runs the built-in tiny Wan pipeline (random weights, offline
tokenizer, seconds on a CPU, no download). It makes NOISE, not a video of your prompt:
it shows lvsa working end to end: 97 frames = 25 latent frames, past Wan's 21-frame
training horizon, so the [LVSA] lines report SPARSE attention.

Steps: check the inputs (nothing is written on bad input) -> denoise (progress bar,
[LVSA] log lines on stderr) -> save the latent atomically -> VAE decode -> write the mp4
-> print a summary (backend, sparse/dense/fallback calls, wall time, peak memory,
output path). If the decode runs out of memory the latent is kept and the message says
how to finish with `lvsa decode`.
"""

_GENERATE_EPILOG = """\
examples:
  lvsa generate                                   # tiny offline demo -> outputs/lvsa-tiny-wan-97f.mp4
  lvsa generate --model /models/Wan2.1-T2V-1.3B-Diffusers --num-frames 161 \\
      --prompt "a red fox running through snow" --output outputs/fox.mp4
  lvsa generate --model /models/HunyuanVideo-1.5-Diffusers-480p_t2v --num-frames 257 \\
      --output-latent outputs/long.pt            # skip the VAE; decode later (Symptom 2)
  lvsa decode outputs/long.pt                     # -> outputs/long.mp4
  lvsa generate --model DIR --no-lvsa             # dense baseline, same seed

paths: relative paths resolve against the working directory; the absolute path is
printed. In a container, write below a bind-mounted working directory with a relative
path (docker run -v $(pwd):/workdir/code -w /workdir/code ... --output outputs/x.mp4).

lvsa settings not exposed as flags (window, first frames, geometry, logging) come from
LVSA_* variables or LVSA_CONFIG; see `lvsa info --vars`.
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``generate`` to ``lvsa``'s subcommands."""
    p = subparsers.add_parser(
        "generate", help="generate a video with lvsa (no arguments: tiny offline demo)",
        description=_GENERATE_DESCRIPTION, epilog=_GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and video")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="local diffusers pipeline directory (WanPipeline, HunyuanVideo15Pipeline or "
                        "CogVideoXPipeline; nothing is downloaded), or a built-in tiny model: tiny-wan, "
                        "tiny-hunyuan, tiny-cogvideox (random weights: noise). Default: tiny-wan")
    g.add_argument("--prompt", default="a red fox running through fresh snow, cinematic",
                   help="text prompt (default: %(default)r)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT", help="negative prompt (pipeline default)")
    g.add_argument("--num-frames", type=V.positive_int, default=None, metavar="F",
                   help="video frames; (F-1) must be divisible by the VAE temporal factor (4): 81, 121, 161, "
                        "... Default: the pipeline's (81 Wan, 121 HunyuanVideo 1.5, 49 CogVideoX); for the "
                        "tiny models 97 / 145 / 65, past their training horizons")
    g.add_argument("--height", type=V.positive_int, default=None, metavar="H",
                   help="pixels; a multiple of VAE spatial factor x patch size (16 for Wan, HunyuanVideo 1.5 "
                        "and CogVideoX). Default: the pipeline's (64 for the tiny models)")
    g.add_argument("--width", type=V.positive_int, default=None, metavar="W",
                   help="pixels; same rule as --height. Default: the pipeline's (64 for the tiny models)")
    g.add_argument("--steps", type=V.positive_int, default=None, metavar="N",
                   help="denoising steps (default: the pipeline's; 8 for the tiny models)")
    g.add_argument("--guidance-scale", type=float, default=None, metavar="G",
                   help="classifier-free guidance scale (default: the pipeline's)")
    g.add_argument("--seed", type=V.seed_int, default=0,
                   help="random seed, 0 to 2**64-1 (default: %(default)s)")
    g.add_argument("--fps", type=V.positive_int, default=None,
                   help="frames per second of the mp4 (default: 16 Wan, 24 HunyuanVideo, 8 CogVideoX)")
    V.add_device_args(g)
    s = p.add_argument_group("lvsa (flags beat LVSA_* variables)")
    s.add_argument("--backend", default=None, metavar="NAME",
                   help="attention backend (reference, triton, flashinfer, ascend, ...); an explicit "
                        "backend that cannot run is an error listing why. Default: LVSA_BACKEND, else "
                        "automatic by device")
    s.add_argument("--sparsity-scale", type=float, default=None, metavar="X",
                   help="multiplier on the attention budget; <1 is sparser (default: LVSA_SPARSITY_SCALE "
                        "or 1.0)")
    s.add_argument("--reference-latent-frames", type=V.positive_int, default=None, metavar="N",
                   help="the model's training horizon in latent frames (default: the model's own: 21 Wan, "
                        "33 HunyuanVideo 1.5, 13 CogVideoX); a different value is warned about")
    s.add_argument("--riflex", action="store_true",
                   help="RIFLEx: past the training horizon, lower the one temporal RoPE frequency that would "
                        "repeat inside the clip (against the video looping; LVSA_RIFLEX=1)")
    s.add_argument("--context-parallel", default=None, choices=["auto", "ulysses", "sequence", "off"],
                   help="under torchrun: split one generation over the ranks (default auto: ulysses when "
                        "the heads divide by the world size, else sequence; LVSA_CONTEXT_PARALLEL)")
    s.add_argument("--no-lvsa", action="store_true",
                   help="dense baseline: run the unmodified pipeline (same seed, same outputs layout)")
    o = p.add_argument_group("outputs")
    o.add_argument("--output", default=None, metavar="PATH.mp4",
                   help="the video (default: outputs/lvsa-<model>-<F>f.mp4; relative to the working "
                        "directory). Written atomically")
    o.add_argument("--output-latent", default=None, metavar="PATH.pt",
                   help="save the denoised latent and the metadata `lvsa decode` needs, and skip the VAE "
                        "decode unless --output is given too. Without it the latent is still saved (under a "
                        "hidden name of this run, .<video>.*.lvsa-staging.pt, next to the mp4) before decoding: "
                        "removed once the mp4 is written, renamed to <video>.latent.pt and named in a message "
                        "if the decode fails or is interrupted")
    V.add_overwrite_arg(o)
    o.add_argument("--vae-tiling", action="store_true",
                   help="decode with VAE tiling (less memory) where the model supports it")
    p.set_defaults(func=run_generate)
    return p


@dataclass
class Job:
    """One generation: what :func:`prepare` decided, filled in as the run goes."""
    args: Any
    spec: Any
    factors: Any
    settings: Dict[str, Any]
    num_frames: Optional[int]
    height: Optional[int]
    width: Optional[int]
    steps: Optional[int]
    want_video: bool
    out_path: Optional[str]
    latent_path: str
    keep_latent: bool
    device: Any = None
    dtype: Any = None
    t_start: float = field(default_factory=time.perf_counter)


def _settings(args) -> Dict[str, Any]:
    s = {"backend": args.backend, "sparsity_scale": args.sparsity_scale,
         "reference_latent_frames": args.reference_latent_frames, "riflex": args.riflex or None,
         "context_parallel": getattr(args, "context_parallel", None)}
    return {k: v for k, v in s.items() if v is not None}


def run_generate(args) -> int:
    from ..devices import default_device_kind
    from ..parallel import command_session

    kind = torch_device_kind(args.device) if args.device else default_device_kind()
    # under torchrun: the process group for the device kind, cuda:LOCAL_RANK, only rank 0
    # prints and writes, destroy_process_group always (one place: lvsa.parallel)
    with command_session(kind) as dist:
        return V.run_command("generate", lambda a, state: generate(a, state, dist), args)


def torch_device_kind(spec: str) -> str:
    try:
        import torch
        return torch.device(spec).type
    except RuntimeError as e:
        raise V.UserError(f"--device {spec}: {e}") from None


def generate(args, state: "V.RunState", dist=None) -> int:
    """The whole flow; ``state`` tracks the phase and the files for interrupts and failures;
    ``dist`` is the torchrun session (``None`` or inactive: one process)."""
    job = prepare(args, dist)
    state.phase = "loading the pipeline"
    pipe, adapter = load(job)
    state.phase = "denoising"
    latent, summary, t_denoise = denoise(job, pipe)
    if dist is not None and not dist.is_main:
        return 0  # every rank holds the whole latent; rank 0 writes it (and the video)
    return finish(job, state, pipe, adapter, latent, summary, t_denoise)


def prepare(args, dist=None) -> Job:
    """Every check before anything heavy or anything written."""
    from ..container import container_path_warning
    from ..models import call_sizes, check_geometry, device_and_dtype, model_factors, resolve_model
    from ..outputs import resolve_output_path

    t_start = time.perf_counter()
    spec = resolve_model(args.model)
    num_frames, height, width, steps = call_sizes(spec, args)

    settings = _settings(args)
    config = None
    if not args.no_lvsa:
        from ..config import Config
        try:
            config = Config.load(**settings)
        except ValueError as e:
            raise V.UserError(str(e)) from None
    factors = model_factors(spec)
    check_geometry(num_frames, height, width, factors)
    if dist is not None and dist.active:
        _check_context_parallel(args, spec, factors, num_frames, height, width, settings, dist)
    suffix = "-dense" if args.no_lvsa else ""
    frames_tag = f"{num_frames}f" if num_frames else "default"
    want_video = args.output is not None or args.output_latent is None
    out_arg = args.output or os.path.join("outputs", f"lvsa-{spec.name}-{frames_tag}{suffix}.mp4")
    out_path = resolve_output_path(out_arg, "--output", ".mp4") if want_video else None
    if args.output_latent is not None:
        latent_arg, keep_latent = args.output_latent, True
    else:
        latent_arg, keep_latent = re.sub(r"\.mp4$", "", out_path, flags=re.I) + ".latent.pt", False
    latent_path = resolve_output_path(latent_arg, "--output-latent", ".pt")
    for flag, arg, path in (("--output", out_arg, out_path), ("--output-latent", latent_arg, latent_path)):
        if path is not None and (flag == "--output" or keep_latent):
            w = container_path_warning(arg, path, flag)
            if w:
                V.note("generate", w)
    device, dtype = device_and_dtype(args.device, args.dtype, spec.tiny)
    if dist is not None and dist.active and dist.device is not None:
        device = dist.device  # each rank on its own device (cuda:LOCAL_RANK)
    if config is not None:
        check_backend(args.backend, config, spec, device, dtype)
    return Job(args, spec, factors, settings, num_frames, height, width, steps, want_video, out_path,
               latent_path, keep_latent, device, dtype, t_start)


def _check_context_parallel(args, spec, factors, num_frames, height, width, settings, dist) -> None:
    """Under torchrun: the split must work before anything loads (the same check, and so the
    same exit status, on every rank; rank 0 alone prints it)."""
    from ..config import Config
    from ..models import read_json
    from ..parallel import divisibility_problem

    if args.no_lvsa:
        raise V.UserError("--no-lvsa under torchrun would run the whole dense generation on every rank; "
                          "run it as one process, or use diffusers' enable_parallelism for dense context "
                          "parallelism")
    mode = settings.get("context_parallel")
    if mode is None:  # LVSA_CONTEXT_PARALLEL / LVSA_CONFIG, else auto under torchrun
        cfg = Config.load()
        mode = cfg.context_parallel if cfg.is_set("context_parallel") else "auto"
    if mode == "off":
        raise V.UserError("--context-parallel off under torchrun would run the whole generation on every rank; "
                          "launch one process instead")
    seq = None
    if num_frames and height and width:
        seq = (factors.latent_frames(num_frames) // factors.patch_t) * factors.patches_per_frame(height, width)
    heads = None
    if spec.path:
        heads = read_json(os.path.join(spec.path, "transformer", "config.json")).get("num_attention_heads")
    problem = divisibility_problem(dist.world_size, seq, heads, mode)
    if problem:
        raise V.UserError(problem)
    settings["context_parallel"] = mode


def check_backend(explicit: Optional[str], config, spec, device, dtype) -> None:
    """A backend named by --backend / LVSA_BACKEND / LVSA_CONFIG must exist and run on this
    device, dtype and the model's heads: checked here, before the pipeline loads (minutes
    for a 14B model), whether the run turns out sparse or dense."""
    from ..dispatch import check_requested, requested_backend
    from ..errors import BackendUnavailable, UnknownBackend
    from ..integrations.base import cfg_get
    from ..models import model_configs

    name, source = requested_backend(explicit, config)
    if name == "auto":
        return
    _, tr = model_configs(spec)
    heads = int(cfg_get(tr, "num_attention_heads", 1) or 1)
    head_dim = int(cfg_get(tr, "attention_head_dim", 64) or 64)
    try:
        check_requested(device, dtype, head_dim=head_dim, num_heads=heads, requested=explicit, config=config)
    except (UnknownBackend, BackendUnavailable) as e:
        where = "--backend" if source == "argument" else source
        raise V.UserError(f"{where}={name}: {e} (checked before loading {spec.name}: {heads} heads of "
                          f"{head_dim})") from None


def load(job: Job):
    """Load the pipeline on the job's device and enable lvsa in it; ``(pipe, adapter)``."""
    from .. import integrations
    from ..integrations.registry import adapter_for_family
    from ..models import load_pipeline

    args, spec = job.args, job.spec
    if spec.tiny:
        V.note("generate", f"no --model given: using the built-in {spec.name} pipeline (random weights, offline "
                           "tokenizer). It makes NOISE, not a video of your prompt: it shows lvsa working end to "
                           "end. For real output pass --model /path/to/a/diffusers/pipeline/directory."
               if args.model is None else
               f"{spec.name} is a built-in tiny model with random weights: the output is noise.")
    adapter = adapter_for_family(spec.family)
    pipe = load_pipeline(spec, job.device, job.dtype)
    if args.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    if args.no_lvsa:
        if job.settings:
            V.note("generate", f"--no-lvsa: ignoring {', '.join(sorted(job.settings))}")
    else:
        try:
            integrations.enable(pipe, **job.settings)
        except ValueError as e:
            raise V.UserError(str(e)) from None
    pipe.set_progress_bar_config(desc="denoising", unit="step", leave=True)
    return pipe, adapter


def denoise(job: Job, pipe):
    """Run the pipeline to its denoised latent; ``(latent, lvsa summary or None, seconds)``."""
    import torch

    from .. import integrations
    from ..dispatch import BackendUnavailable
    from ..tiny import TINY_CALL_KWARGS

    args, spec = job.args, job.spec
    call: Dict[str, Any] = dict(TINY_CALL_KWARGS[spec.family]) if spec.tiny else {}
    for k, v in (("num_frames", job.num_frames), ("height", job.height), ("width", job.width),
                 ("num_inference_steps", job.steps), ("negative_prompt", args.negative_prompt)):
        if v is not None:
            call[k] = v
    if args.guidance_scale is not None:
        if spec.family == "hunyuan":  # HunyuanVideo 1.5 takes guidance from its guider component
            pipe.guider.guidance_scale = args.guidance_scale
        else:
            call["guidance_scale"] = args.guidance_scale
    V.reset_peak(job.device)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            result = pipe(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed),
                          output_type="latent", **call)
    except BackendUnavailable as e:  # an explicit --backend that cannot run this problem
        raise V.UserError(str(e)) from None
    latent = result.frames if hasattr(result, "frames") else result[0]
    summary = integrations.last_summary(pipe) if not args.no_lvsa else None
    if job.num_frames is None:  # the pipeline's own default (needed to undo CogVideoX 1.5 padding)
        import inspect
        default = inspect.signature(type(pipe).__call__).parameters.get("num_frames")
        job.num_frames = default.default if default is not None and isinstance(default.default, int) else None
    return latent, summary, time.perf_counter() - t0


def finish(job: Job, state: "V.RunState", pipe, adapter, latent, summary, t_denoise: float) -> int:
    """Save the latent, decode to the mp4 where asked, print the summary; the exit code."""
    from ..outputs import LATENT_FORMAT, save_latent

    args, spec = job.args, job.spec
    fps = args.fps or adapter.fps
    T_tok, P_tok = adapter.latent_tokens(latent.shape, job.factors)
    meta = {
        "format": LATENT_FORMAT, "family": spec.family, "pipeline_class": spec.pipeline_class,
        "model": spec.name if spec.tiny else spec.path, "prompt": args.prompt, "seed": args.seed,
        "num_frames": job.num_frames, "height": job.height, "width": job.width, "steps": job.steps, "fps": fps,
        "latent_shape": list(latent.shape), "latent_tokens": [T_tok, P_tok],
        "lvsa": (None if summary is None else {k: v for k, v in summary.items()
                                              if isinstance(v, (int, float, str, dict, type(None)))}),
    }
    # top-level num_frames as the troubleshooting guide shows ({"latent": tensor, "num_frames": 257, ...})
    state.phase = "saving the latent"
    tmp = state.outs.stage(job.latent_path)
    save_latent(tmp, {"latent": latent.detach().to("cpu"), "num_frames": job.num_frames, "metadata": meta})
    if job.keep_latent:
        state.latent, state.latent_written = state.outs.place(tmp), True
    else:  # the safety copy: hidden, this run's own; a visible name only if the mp4 is not written
        state.rescue = (tmp, job.latent_path)
    t1 = time.perf_counter()
    rc, video_path = 0, None
    if job.want_video:
        rc, video_path = V.decode_to_mp4(state, pipe, adapter, latent, job.out_path, fps, job.num_frames)
        if rc == 0:
            state.drop_rescue()
    t_decode = time.perf_counter() - t1
    state.phase = "printing the summary"
    print_summary(job, summary, T_tok, P_tok, latent.shape, t_denoise, t_decode if job.want_video else None,
                  video_path, state.latent if state.latent_written else None, meta)
    return rc


def print_summary(job: Job, summary, T, P, shape, t_denoise, t_decode, out_path, latent_path, meta) -> None:
    spec = job.spec
    lines = [f"lvsa generate: done in {time.perf_counter() - job.t_start:.1f}s (denoise {t_denoise:.1f}s"
             + (f", decode {t_decode:.1f}s)" if t_decode is not None else ", no decode)")]
    lines.append(f"  model:     {spec.name}" + (" (built-in tiny, random weights: noise)" if spec.tiny else ""))
    lines.append(f"  video:     {meta['num_frames'] or '(pipeline default)'} frames, latent {list(shape)}, "
                 f"T_lat={T} P={P}, {meta['steps'] or '(default)'} steps, seed {meta['seed']}")
    if job.args.no_lvsa:
        lines.append("  lvsa:      off (--no-lvsa: dense baseline)")
    elif summary:
        ratio = summary.get("extension_ratio")
        mode = "SPARSE" if summary.get("sparse_calls") else ("DENSE (T_lat <= reference)"
                                                           if summary.get("dense_calls") else "not engaged")
        reasons = summary.get("fallbacks_by_reason") or {}
        fb = f"{summary.get('fallbacks', 0)}" + (f" ({', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))})"
                                                 if reasons else "")
        lines.append(f"  lvsa:      {mode} backend={summary.get('backend')} sparse_calls={summary.get('sparse_calls')} "
                     f"dense_calls={summary.get('dense_calls')} fallbacks={fb}")
        lines.append(f"  schedule:  reference={summary.get('reference')} target={summary.get('T')} "
                     + (f"extension_ratio={ratio:.2f}x" if ratio is not None else ""))
    lines.append(f"  peak mem:  {V.peak_memory(job.device)}")
    if latent_path:
        lines.append(f"  latent:    {latent_path}")
    if out_path:
        lines.append(f"  output:    {out_path}")
    print("\n".join(lines), flush=True)
