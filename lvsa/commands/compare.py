"""``lvsa compare``: how different is the lvsa video from the dense one?

One pipeline, one prompt, one seed, run two or three times: dense (lvsa off), with lvsa,
and with ``--riflex`` also lvsa + RIFLEx. Written to ``--output-dir``:

* ``compare.mp4``: the runs side by side (dense | lvsa | lvsa+riflex | diff: |lvsa - dense| x4);
* ``metrics.png``: per-frame PSNR and SSIM against the dense run, of the decoded videos
  and of the latents, with the training horizon marked;
* ``summary.json``: settings, the engine summaries, the RIFLEx change, every per-frame value
  and their mean/min;
* ``latents.pt``: every run's denoised latent, saved before any decode (``torch.load``).

PSNR and SSIM come from torchmetrics, the plot from matplotlib (``pip install
'lvsa[compare]'``). On the built-in tiny models the numbers only show the machinery
works (random weights: noise); quality claims need a real checkpoint (``--model DIR``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from . import _video as V  # ImportError without the diffusers extra (cli.py explains)
from ..errors import UserError

NAMES = ("compare",)
EXTRA = "compare"
#: a PSNR of identical frames is infinite: plotted at this ceiling, stored as null in the JSON
PSNR_PLOT_CEILING = 100.0

_DESCRIPTION = """\
Run the same prompt and seed dense and with lvsa (and, with --riflex, with lvsa + RIFLEx),
then measure how far each video is from the dense one: per-frame PSNR and SSIM of the
decoded videos and of the latents (torchmetrics), a side-by-side mp4, a PNG plot over
time and a JSON summary.

With no --model this runs the built-in tiny Wan pipeline (random weights: NOISE). That
checks the machinery, not quality: quality claims need a real checkpoint (--model DIR).
"""

_EPILOG = """\
examples:
  lvsa compare                                    # tiny offline model -> outputs/compare-tiny-wan-97f/
  lvsa compare --model /models/Wan2.1-T2V-1.3B-Diffusers --num-frames 161 --riflex \\
      --prompt "a red fox running through snow" --output-dir outputs/fox-compare

needs: pip install 'lvsa[compare]' (torchmetrics, matplotlib)
"""


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="dense vs lvsa (vs lvsa+RIFLEx): side-by-side mp4, PSNR/SSIM, plot, JSON",
                       description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and video (as for lvsa generate)")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="local diffusers pipeline directory, or tiny-wan / tiny-hunyuan / tiny-cogvideox "
                        "(default: tiny-wan)")
    g.add_argument("--prompt", default="a red fox running through fresh snow, cinematic",
                   help="text prompt (default: %(default)r)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT", help="negative prompt (pipeline default)")
    g.add_argument("--num-frames", type=V.positive_int, default=None, metavar="F",
                   help="video frames (default: the pipeline's; 97 / 145 / 65 for the tiny models)")
    g.add_argument("--height", type=V.positive_int, default=None, metavar="H", help="pixels")
    g.add_argument("--width", type=V.positive_int, default=None, metavar="W", help="pixels")
    g.add_argument("--steps", type=V.positive_int, default=None, metavar="N", help="denoising steps")
    g.add_argument("--guidance-scale", type=float, default=None, metavar="G", help="CFG scale")
    g.add_argument("--seed", type=V.seed_int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--fps", type=V.positive_int, default=None, help="frames per second of compare.mp4")
    V.add_device_args(g)
    s = p.add_argument_group("lvsa (flags beat LVSA_* variables)")
    s.add_argument("--backend", default=None, metavar="NAME", help="attention backend (default: automatic)")
    s.add_argument("--sparsity-scale", type=float, default=None, metavar="X", help="multiplier on the budget")
    s.add_argument("--reference-latent-frames", type=V.positive_int, default=None, metavar="N",
                   help="training horizon in latent frames (default: the model's own)")
    s.add_argument("--riflex", action="store_true", help="a third run: lvsa + RIFLEx")
    o = p.add_argument_group("outputs")
    o.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where compare.mp4, metrics.png and summary.json go (default: "
                        "outputs/compare-<model>-<F>f; relative to the working directory)")
    o.add_argument("--vae-tiling", action="store_true",
                   help="decode with VAE tiling (less memory) where the model supports it")
    p.set_defaults(func=run_compare)
    return p


# ================================================================= metrics
def require_extra() -> None:
    """The compare extra (torchmetrics, matplotlib) or one message saying how to get it."""
    missing = [m for m in ("torchmetrics", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"needs {' and '.join(missing)}: pip install 'lvsa[compare]'")


def _ssim_window(h: int, w: int):
    """``(size, sigma)``: the standard 11x11 Gaussian window (sigma 1.5), shrunk in proportion (odd
    size) for images smaller than that, such as latents. torchmetrics sizes a Gaussian window
    from sigma (``2 * int(3.5 * sigma + 0.5) + 1``), so sigma is what sets it."""
    k = min(11, h, w)
    k = k if k % 2 else k - 1
    return k, 1.5 * k / 11


def frame_metrics(a, b, data_range: float, chunk: int = 16) -> Dict[str, List[Optional[float]]]:
    """Per-frame PSNR (dB; ``None`` for identical frames) and SSIM of ``a`` against ``b``.

    ``a``, ``b``: ``[N, C, H, W]`` float tensors (N frames); ``data_range`` the value range.
    """
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = a.detach().to("cpu", torch.float32)
    b = b.detach().to("cpu", torch.float32)
    k, sigma = _ssim_window(a.shape[-2], a.shape[-1])
    psnr: List[Optional[float]] = []
    ssim: List[float] = []
    for i in range(0, a.shape[0], chunk):  # bounded memory on long, large videos
        x, y = a[i:i + chunk], b[i:i + chunk]
        p = peak_signal_noise_ratio(x, y, data_range=data_range, reduction="none", dim=(1, 2, 3))
        psnr += [None if math.isinf(v) else v for v in p.tolist()]
        if k >= 3:
            ssim += structural_similarity_index_measure(x, y, data_range=data_range, kernel_size=k,
                                                        sigma=sigma, reduction="none").tolist()
        else:  # a 1- or 2-pixel latent has no SSIM window
            ssim += [float("nan")] * x.shape[0]
    return {"psnr": psnr, "ssim": ssim, "ssim_kernel": k, "ssim_sigma": sigma}


def _stats(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return {"mean": sum(finite) / len(finite) if finite else None, "min": min(finite) if finite else None,
            "identical_frames": sum(v is None for v in values)}


def compare_pair(video, dense_video, latent, dense_latent, latent_frame_dim: int) -> Dict[str, Any]:
    """Video and latent metrics of one run against the dense run."""
    import torch

    v = torch.as_tensor(video).permute(0, 3, 1, 2)           # [F, 3, H, W] in [0, 1]
    dv = torch.as_tensor(dense_video).permute(0, 3, 1, 2)
    lat = latent[0].movedim(latent_frame_dim - 1, 0).float()  # [T, C, h, w]; frame dim counted with B
    dlat = dense_latent[0].movedim(latent_frame_dim - 1, 0).float()
    lat_range = float(dlat.max() - dlat.min()) or 1.0
    out = {"video": frame_metrics(v, dv, 1.0), "latent": frame_metrics(lat, dlat, lat_range)}
    out["latent"]["data_range"] = lat_range
    for part in out.values():
        part["psnr_stats"] = _stats(part["psnr"])
        part["ssim_stats"] = _stats(part["ssim"])
    return out


# ================================================================= outputs
def side_by_side(videos: Sequence[Any], labels: Sequence[str], diff_gain: float = 4.0):
    """``[F, H', W', 3]`` uint8: the videos in a row, then ``|videos[1] - videos[0]| x gain``
    ("diff"), under a 12-pixel band of labels."""
    import numpy as np
    from PIL import Image, ImageDraw

    vids = [np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0) for v in videos]
    panels = list(vids)
    names = list(labels)
    if len(vids) >= 2:
        panels.append(np.clip(np.abs(vids[1] - vids[0]) * diff_gain, 0.0, 1.0))
        names.append(f"diff x{diff_gain:g}")
    frames = (np.concatenate(panels, axis=2) * 255.0).round().astype(np.uint8)
    F_, H, W = vids[0].shape[:3]
    band = 12
    header = Image.new("RGB", (frames.shape[2], band), (0, 0, 0))
    draw = ImageDraw.Draw(header)
    for i, name in enumerate(names):
        draw.text((i * W + 2, 0), name, fill=(255, 255, 255))
    head = np.broadcast_to(np.asarray(header), (F_, band, frames.shape[2], 3))
    out = np.concatenate([head, frames], axis=1)
    if out.shape[1] % 2:  # H.264 wants even sizes
        out = np.concatenate([out, np.zeros_like(out[:, :1])], axis=1)
    return out


def plot_metrics(path: str, results: Dict[str, Dict[str, Any]], reference_video_frame: Optional[int],
                 reference_latent: Optional[int], title: str) -> None:
    """PSNR and SSIM over time (videos and latents) of every run against the dense run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex="col")
    for col, part, ref, xlabel in ((0, "video", reference_video_frame, "video frame"),
                                   (1, "latent", reference_latent, "latent frame")):
        for row, metric, ylabel in ((0, "psnr", "PSNR vs dense (dB)"), (1, "ssim", "SSIM vs dense")):
            ax = axes[row][col]
            for name, res in results.items():
                vals = res[part][metric]
                ys = [PSNR_PLOT_CEILING if v is None else v for v in vals]
                ax.plot(range(len(ys)), ys, marker=".", label=name)
            if ref is not None:
                ax.axvline(ref, color="gray", linestyle="--", linewidth=1, label="training horizon")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel(xlabel)
            if row == 0:
                ax.set_title(f"{part}s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + f".lvsa-tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + f".lvsa-tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_safe(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ================================================================= the command
def run_compare(args) -> int:
    try:
        return _compare(args)
    except UserError as e:
        V.err("compare", str(e))
        return V.EXIT_BAD_INPUT


def _settings(args) -> Dict[str, Any]:
    s = {"backend": args.backend, "sparsity_scale": args.sparsity_scale,
         "reference_latent_frames": args.reference_latent_frames}
    return {k: v for k, v in s.items() if v is not None}


def _compare(args) -> int:
    t_start = time.perf_counter()
    require_extra()
    from ..models import (call_sizes, check_geometry, device_and_dtype, load_pipeline, model_factors,
                          resolve_model)
    from ..outputs import Outputs, resolve_output_path, save_latent, write_mp4

    spec = resolve_model(args.model)
    from ..config import Config
    from ..tiny import TINY_CALL_KWARGS

    num_frames, height, width, steps = call_sizes(spec, args)
    settings = _settings(args)
    try:
        Config.load(**settings)
        if args.backend:
            from ..plugins import get_backend
            get_backend(args.backend)
    except ValueError as e:
        raise UserError(str(e)) from None
    factors = model_factors(spec)
    check_geometry(num_frames, height, width, factors)
    frames_tag = f"{num_frames}f" if num_frames else "default"
    out_dir = os.path.abspath(os.path.expanduser(args.output_dir or os.path.join(
        "outputs", f"compare-{spec.name}-{frames_tag}")))
    mp4_path = resolve_output_path(os.path.join(out_dir, "compare.mp4"), "--output-dir", ".mp4")
    png_path = os.path.join(out_dir, "metrics.png")
    json_path = os.path.join(out_dir, "summary.json")
    latents_path = os.path.join(out_dir, "latents.pt")
    device, dtype = device_and_dtype(args.device, args.dtype, spec.tiny)
    if spec.tiny:
        V.note("compare", f"{spec.name} is a built-in tiny model with random weights: the videos are noise "
                              "and the metrics only show the comparison works. Quality claims need a real "
                              "checkpoint: --model /path/to/a/diffusers/pipeline/directory.")

    import torch

    from .. import integrations
    from ..integrations import adapter_for_family

    adapter = adapter_for_family(spec.family)
    pipe = load_pipeline(spec, device, dtype)
    if args.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(leave=False)
    call: Dict[str, Any] = dict(TINY_CALL_KWARGS[spec.family]) if spec.tiny else {}
    for k, v in (("num_frames", num_frames), ("height", height), ("width", width),
                 ("num_inference_steps", steps), ("negative_prompt", args.negative_prompt)):
        if v is not None:
            call[k] = v
    if args.guidance_scale is not None:
        if spec.family == "hunyuan":
            pipe.guider.guidance_scale = args.guidance_scale
        else:
            call["guidance_scale"] = args.guidance_scale

    runs = [("dense", None), ("lvsa", dict(settings))]
    if args.riflex:
        runs.append(("lvsa+riflex", dict(settings, riflex=True)))
    latents: Dict[str, Any] = {}
    videos: Dict[str, Any] = {}
    info: Dict[str, Dict[str, Any]] = {}
    from ..dispatch import BackendUnavailable

    for name, run_settings in runs:
        integrations.disable(pipe)
        if run_settings is not None:
            try:
                integrations.enable(pipe, **run_settings)
            except ValueError as e:
                raise UserError(str(e)) from None
        V.note("compare", f"run {name}: denoising")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                res = pipe(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed),
                           output_type="latent", **call)
        except BackendUnavailable as e:
            raise UserError(str(e)) from None
        latent = (res.frames if hasattr(res, "frames") else res[0]).detach().to("cpu")
        t_denoise = time.perf_counter() - t0
        summary = integrations.last_summary(pipe)
        info[name] = {"settings": run_settings, "denoise_s": round(t_denoise, 3), "lvsa": summary,
                      "riflex": None if summary is None else summary.get("riflex")}
        latents[name] = latent
    integrations.disable(pipe)
    # the denoised latents first (the costly part): a failing decode loses none of them
    outs = Outputs(overwrite=True, cmd="compare")  # the command's own directory: a rerun replaces
    tmp = outs.stage(latents_path)
    save_latent(tmp, {"format": "lvsa-compare-latents/1", "latents": latents, "num_frames": num_frames,
                      "family": spec.family, "runs": info})
    outs.place(tmp)
    for name in latents:
        t1 = time.perf_counter()
        try:
            with torch.no_grad():
                videos[name] = adapter.decode(pipe, latents[name], num_frames=num_frames)
        except BaseException:
            V.err("compare", f"the VAE decode of run {name} failed; the denoised latents of every run are "
                                 f"kept in {latents_path} (torch.load; --vae-tiling uses less memory)")
            raise
        info[name]["decode_s"] = round(time.perf_counter() - t1, 3)

    # ---- metrics against the dense run
    frame_dim = 1 if spec.family == "cogvideox" else 2  # latents [B, F, C, H, W] vs [B, C, F, H, W]
    results = {name: compare_pair(videos[name], videos["dense"], latents[name], latents["dense"], frame_dim)
               for name, _ in runs[1:]}
    T_lat = latents["dense"].shape[frame_dim]
    ref = next((i["lvsa"] or {}).get("reference") for n, i in info.items() if n != "dense")
    ref_video = None if ref is None or ref >= T_lat else (ref - 1) * factors.vae_temporal + 1
    ref_latent = None if ref is None or ref >= T_lat else ref

    # ---- outputs
    fps = args.fps or adapter.fps
    names = [n for n, _ in runs]
    tmp = outs.stage(mp4_path)
    try:
        write_mp4(tmp, side_by_side([videos[n] for n in names], names), fps)
        outs.place(tmp)
    finally:
        outs.discard_all()
    title = (f"{spec.name}: {num_frames or 'default'} frames, T_lat={T_lat}, reference={ref}, seed {args.seed}"
             + (" (tiny model, random weights: noise)" if spec.tiny else ""))
    plot_metrics(png_path, results, ref_video, ref_latent, title)
    summary = {
        "format": "lvsa-compare/1", "model": spec.name if spec.tiny else spec.path, "family": spec.family,
        "tiny_random_weights": spec.tiny, "prompt": args.prompt, "seed": args.seed, "num_frames": num_frames,
        "height": height, "width": width, "steps": steps, "latent_shape": list(latents["dense"].shape),
        "latent_frames": T_lat, "reference_latent_frames": ref, "reference_video_frame": ref_video,
        "runs": info, "metrics_vs_dense": results,
        "outputs": {"video": mp4_path, "plot": png_path, "summary": json_path, "latents": latents_path},
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    _write_json_atomic(json_path, _json_safe(summary))

    lines = [f"lvsa compare: done in {time.perf_counter() - t_start:.1f}s ({spec.name}, T_lat={T_lat}, "
             f"reference={ref})"]
    for name, res in results.items():
        v, lat = res["video"], res["latent"]
        lines.append(f"  {name:<12} vs dense: video PSNR mean {_fmt(v['psnr_stats']['mean'])} dB "
                     f"(min {_fmt(v['psnr_stats']['min'])}), SSIM mean {_fmt(v['ssim_stats']['mean'], 4)} "
                     f"(min {_fmt(v['ssim_stats']['min'], 4)}); latent PSNR mean {_fmt(lat['psnr_stats']['mean'])} dB")
    lines += [f"  video:   {mp4_path}", f"  plot:    {png_path}", f"  summary: {json_path}",
              f"  latents: {latents_path}"]
    print("\n".join(lines), flush=True)
    return 0


def _fmt(v, digits: int = 2) -> str:
    return "identical" if v is None else f"{v:.{digits}f}"

