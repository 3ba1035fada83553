"""``lvsa decode``: a latent saved by ``lvsa generate`` → an mp4, loading only the model's VAE."""
from __future__ import annotations

import argparse
import os
import re
import time

from . import _video as V  # ImportError without the diffusers extra


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``decode`` to ``lvsa``'s subcommands."""
    p = subparsers.add_parser(
        "decode", help="decode a latent saved by `lvsa generate` into an mp4",
        description=("Decode a latent written by `lvsa generate` (--output-latent, or kept after a decode "
                     "that ran out of memory) into an mp4. Only the VAE of the model is loaded; VAE tiling "
                     "is on where the model supports it."),
        epilog=("examples:\n  lvsa decode outputs/long.pt\n"
                "  lvsa decode outputs/long.pt --model /models/Wan2.1-T2V-1.3B-Diffusers --output long.mp4\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("latent", metavar="LATENT.pt", help="file written by lvsa generate")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="the pipeline directory whose VAE decodes it (default: the one recorded in the file; "
                        "pass it when the model moved)")
    p.add_argument("--output", default=None, metavar="PATH.mp4",
                   help="the video (default: LATENT with .mp4 instead of .pt). Written atomically")
    V.add_overwrite_arg(p)
    p.add_argument("--no-tiling", action="store_true", help="decode without VAE tiling (faster, more memory)")
    p.add_argument("--fps", type=V.positive_int, default=None, help="frames per second (default: the recorded one)")
    V.add_device_args(p)
    p.set_defaults(func=run_decode)
    return p


def run_decode(args) -> int:
    return V.run_command("decode", decode, args)


def decode(args, state: "V.RunState") -> int:
    from ..container import container_path_warning
    from ..integrations.registry import adapter_for_family
    from ..models import device_and_dtype, load_pipeline, model_configs, model_factors, resolve_model
    from ..outputs import check_latent_for_model, load_latent_file, resolve_output_path

    t_start = time.perf_counter()
    latent_file = os.path.abspath(os.path.expanduser(args.latent))
    data = load_latent_file(latent_file)
    state.latent = latent_file
    meta = data["metadata"]
    if args.model:
        spec = resolve_model(args.model)
        origin = f"--model {args.model}"
    else:
        recorded = meta.get("model")
        if not isinstance(recorded, str) or not recorded:
            raise V.UserError(f"{latent_file}: its metadata names no model ('model': {recorded!r}); pass the "
                              "pipeline directory whose VAE decodes it: --model DIR")
        origin = f"the model recorded in {latent_file} ({recorded})"
        spec = resolve_model(recorded, source=f"the model recorded in {latent_file}:",
                             hint=". It was moved or the latent comes from another machine: pass its "
                                  "directory with --model DIR")
    if spec.family != meta.get("family"):
        raise V.UserError(f"{origin} is a {spec.family} model; this latent's metadata says it is a "
                          f"{meta.get('family')!r} latent. Pass the model that made it: --model DIR")
    check_latent_for_model(latent_file, data, spec, model_configs(spec)[0], model_factors(spec))
    out_arg = args.output or re.sub(r"(\.latent)?\.pt$", "", args.latent, flags=re.I) + ".mp4"
    out_path = resolve_output_path(out_arg, "--output", ".mp4")
    w = container_path_warning(out_arg, out_path)
    if w:
        V.note("decode", w)
    device, dtype = device_and_dtype(args.device, args.dtype, spec.tiny)

    adapter = adapter_for_family(spec.family)
    state.phase = "loading the VAE"
    pipe = load_pipeline(spec, device, dtype, vae_only=True)
    tiling = not args.no_tiling and hasattr(pipe.vae, "enable_tiling")
    if tiling:
        pipe.vae.enable_tiling()
    V.reset_peak(device)
    rc, got = V.decode_to_mp4(state, pipe, adapter, data["latent"], out_path,
                              args.fps or meta.get("fps") or adapter.fps, meta.get("num_frames"))
    if rc == 0:
        print(f"lvsa decode: done in {time.perf_counter() - t_start:.1f}s (VAE tiling {'on' if tiling else 'off'}; "
              f"peak mem {V.peak_memory(device)})\n  output:    {got}", flush=True)
    return rc
