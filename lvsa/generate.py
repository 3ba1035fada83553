"""``lvsa generate`` and ``lvsa decode``: the main job, end to end.

``lvsa generate`` loads a local diffusers video pipeline (or builds the tiny offline
one), puts lvsa into its self-attention, denoises with a progress bar, writes the latent
*atomically before* the VAE decode (no lost work: Symptom 2), decodes to an mp4 and
prints a summary. ``lvsa decode LATENT.pt`` turns such a latent into an mp4 later, with
VAE tiling where the model supports it.

Exit codes: 0 done; 2 bad input (one message, nothing written); 3 the VAE decode ran out
of memory (the latent is kept and the message says how to decode it); 1 anything else.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

if importlib.util.find_spec("diffusers") is None:  # lvsa/cli.py turns this into an install hint
    raise ImportError("diffusers is not installed")

EXIT_BAD_INPUT = 2
EXIT_DECODE_OOM = 3
LATENT_FORMAT = "lvsa-latent/1"
TINY_PREFIX = "tiny-"
PIPELINE_FAMILIES = {"WanPipeline": "wan", "HunyuanVideo15Pipeline": "hunyuan", "CogVideoXPipeline": "cogvideox"}


class UserError(Exception):
    """Bad input: printed as one message, exit code 2."""


def _err(cmd: str, msg: str) -> None:
    print(f"lvsa {cmd}: error: {msg}", file=sys.stderr, flush=True)


def _note(cmd: str, msg: str) -> None:
    print(f"lvsa {cmd}: {msg}", file=sys.stderr, flush=True)


# ============================================================== argparse
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


def _int_at_least(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, metavar="DEV",
                   help="torch device (cuda, cuda:1, npu:0, cpu); default: the first GPU/NPU, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights/activations dtype; auto = bfloat16 on GPU/NPU, float32 on CPU and for "
                        "the tiny models (default: auto)")


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``generate`` to ``lvsa``'s subcommands (called by :mod:`lvsa.cli`)."""
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
    g.add_argument("--num-frames", type=_positive_int, default=None, metavar="F",
                   help="video frames; (F-1) must be divisible by the VAE temporal factor (4): 81, 121, 161, "
                        "... Default: the pipeline's (81 Wan, 121 HunyuanVideo 1.5, 49 CogVideoX); for the "
                        "tiny models 97 / 145 / 65, past their training horizons")
    g.add_argument("--height", type=_positive_int, default=None, metavar="H",
                   help="pixels; a multiple of VAE spatial factor x patch size (16 for Wan, HunyuanVideo 1.5 "
                        "and CogVideoX). Default: the pipeline's (64 for the tiny models)")
    g.add_argument("--width", type=_positive_int, default=None, metavar="W",
                   help="pixels; same rule as --height. Default: the pipeline's (64 for the tiny models)")
    g.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="denoising steps (default: the pipeline's; 8 for the tiny models)")
    g.add_argument("--guidance-scale", type=float, default=None, metavar="G",
                   help="classifier-free guidance scale (default: the pipeline's)")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--fps", type=_positive_int, default=None,
                   help="frames per second of the mp4 (default: 16 Wan, 24 HunyuanVideo, 8 CogVideoX)")
    _add_device_args(g)
    s = p.add_argument_group("lvsa (flags beat LVSA_* variables)")
    s.add_argument("--backend", default=None, metavar="NAME",
                   help="attention backend (reference, triton, flashinfer, ascend, ...); an explicit "
                        "backend that cannot run is an error listing why. Default: LVSA_BACKEND, else "
                        "automatic by device")
    s.add_argument("--sparsity-scale", type=float, default=None, metavar="X",
                   help="multiplier on the attention budget; <1 is sparser (default: LVSA_SPARSITY_SCALE "
                        "or 1.0)")
    s.add_argument("--reference-latent-frames", type=_positive_int, default=None, metavar="N",
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
                        "decode unless --output is given too. Without it the latent is still saved next to "
                        "the mp4 before decoding and removed once the mp4 is written")
    o.add_argument("--vae-tiling", action="store_true",
                   help="decode with VAE tiling (less memory) where the model supports it")
    p.set_defaults(func=run_generate)
    return p


def add_decode_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``decode`` to ``lvsa``'s subcommands (called by :mod:`lvsa.cli`)."""
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
    p.add_argument("--no-tiling", action="store_true", help="decode without VAE tiling (faster, more memory)")
    p.add_argument("--fps", type=_positive_int, default=None, help="frames per second (default: the recorded one)")
    _add_device_args(p)
    p.set_defaults(func=run_decode)
    return p


# ============================================================== models
@dataclass
class ModelSpec:
    name: str                 # "tiny-wan" or the directory's base name
    family: str
    path: Optional[str]       # absolute directory, None for tiny models
    pipeline_class: str
    prebuilt: Any = None      # the tiny pipeline, once built

    @property
    def tiny(self) -> bool:
        return self.path is None


def resolve_model(arg: Optional[str]) -> ModelSpec:
    from .tiny import FAMILIES

    if arg is None:
        arg = TINY_PREFIX + "wan"
    if arg.startswith(TINY_PREFIX) and not os.path.isdir(arg):
        fam = arg[len(TINY_PREFIX):]
        if fam not in FAMILIES:
            raise UserError(f"--model {arg}: unknown tiny model; choose from "
                            + ", ".join(TINY_PREFIX + f for f in FAMILIES))
        return ModelSpec(arg, fam, None, {"wan": "WanPipeline", "hunyuan": "HunyuanVideo15Pipeline",
                                          "cogvideox": "CogVideoXPipeline"}[fam])
    path = os.path.abspath(os.path.expanduser(arg))
    if not os.path.isdir(path):
        raise UserError(f"--model {arg}: no such directory ({path}). Pass a local diffusers pipeline "
                        "directory (saved with save_pretrained or downloaded beforehand; nothing is "
                        "downloaded), or tiny-wan / tiny-hunyuan / tiny-cogvideox")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise UserError(f"--model {arg}: not a diffusers pipeline directory (no model_index.json in {path})")
    try:
        with open(index) as fh:
            cls = json.load(fh).get("_class_name", "?")
    except (OSError, ValueError) as e:
        raise UserError(f"--model {arg}: unreadable model_index.json ({e})") from None
    if cls not in PIPELINE_FAMILIES:
        raise UserError(f"--model {arg}: holds a {cls}; lvsa generate runs the text-to-video pipelines "
                        f"{', '.join(PIPELINE_FAMILIES)} (for other pipelines use lvsa.enable(pipe) in Python)")
    return ModelSpec(os.path.basename(path.rstrip(os.sep)) or path, PIPELINE_FAMILIES[cls], path, cls)


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def model_factors(spec: ModelSpec):
    """The VAE/patch factors of a model, read from its config files (no weights loaded)."""
    from .integrations.registry import adapter_for_family

    adapter = adapter_for_family(spec.family)
    if spec.tiny:
        from .tiny import build
        if spec.prebuilt is None:
            spec.prebuilt = build(spec.family)
        return adapter.pipe_factors(spec.prebuilt)
    vae = _read_json(os.path.join(spec.path, "vae", "config.json"))
    tr = _read_json(os.path.join(spec.path, "transformer", "config.json"))
    return adapter.factors(vae, tr)


def _device_and_dtype(args, tiny: bool):
    import torch

    from .devices import default_device

    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError as e:
        raise UserError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    if args.dtype == "auto":
        dtype = torch.float32 if (tiny or device.type == "cpu") else torch.bfloat16
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def load_pipeline(spec: ModelSpec, device, dtype, vae_only: bool = False):
    import torch

    if spec.tiny:
        from .tiny import build
        pipe, spec.prebuilt = spec.prebuilt or build(spec.family), None
        return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    from diffusers import DiffusionPipeline

    skip = {}
    if vae_only:
        index = _read_json(os.path.join(spec.path, "model_index.json"))
        skip = {k: None for k, v in index.items()
                if not k.startswith("_") and k not in ("vae", "scheduler") and isinstance(v, list)}
    import diffusers

    major_minor = tuple(int(x) for x in re.findall(r"\d+", diffusers.__version__)[:2])
    dtype_kw = {"dtype" if major_minor >= (0, 42) else "torch_dtype": dtype}
    try:
        pipe = DiffusionPipeline.from_pretrained(spec.path, local_files_only=True, **dtype_kw, **skip)
    except Exception as e:  # noqa: BLE001 - reported as one message
        hint = ""
        if "low_cpu_mem_usage" in str(e) and importlib.util.find_spec("accelerate") is None:
            hint = (" (diffusers loads this model only with the `accelerate` package installed: "
                    "pip install accelerate)")
        raise UserError(f"--model {spec.path}: could not load the pipeline: {type(e).__name__}: {e}{hint}") from None
    return pipe.to(device)


# ============================================================== validation
def check_geometry(num_frames: Optional[int], height: Optional[int], width: Optional[int], factors) -> None:
    """One clear message per bad value (frames off the VAE grid, sizes off VAE x patch)."""
    vt = factors.vae_temporal
    if num_frames is not None and (num_frames - 1) % vt:
        lo = (num_frames - 1) // vt * vt + 1
        raise UserError(f"--num-frames {num_frames} does not fit the VAE grid: (F-1) must be divisible by {vt} "
                        f"(the VAE packs {vt} frames into one latent frame); nearest valid: {lo} or {lo + vt}")
    mh, mw = factors.spatial_multiple
    for flag, val, m, patch in (("--height", height, mh, factors.patch_h), ("--width", width, mw, factors.patch_w)):
        if val is not None and val % m:
            lo = val // m * m
            near = f"{lo} or {lo + m}" if lo else f"{m}"
            raise UserError(f"{flag} {val} is not divisible by {m} (VAE spatial factor {factors.vae_spatial} "
                            f"x patch size {patch}); nearest valid: {near}")


def resolve_output_path(arg: str, flag: str, suffix: str) -> str:
    """Absolute path (relative ones against the working directory), checked writable; creates nothing."""
    path = os.path.abspath(os.path.expanduser(arg))
    if not path.lower().endswith(suffix):
        raise UserError(f"{flag} {arg}: the file name must end with {suffix}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {arg}: is a directory; give a file name ending with {suffix}")
    parent = os.path.dirname(path)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {arg}: cannot create {parent}: {existing} is a file, not a directory")
    try:  # a real probe: permissions, read-only file systems, root squash
        fd, probe = tempfile.mkstemp(prefix=".lvsa-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {arg}: cannot write in {existing} ({e.strerror or e}); choose a writable "
                        "location, e.g. a relative path such as outputs/video.mp4") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {arg}: the existing file is not writable")
    return path


# ---------------------------------------------------------- containers
_VIRTUAL_FS = {"proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "overlay",
               "aufs", "securityfs", "debugfs", "tracefs", "pstore", "bpf", "ramfs", "shm", "fusectl"}


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_mountinfo(text: str) -> List[Tuple[str, str, str]]:
    """``(mount_point, fstype, root)`` per line of ``/proc/self/mountinfo``."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if " - " not in line or len(parts) < 7:
            continue
        left, right = line.split(" - ", 1)
        lp, rp = left.split(), right.split()
        if len(lp) < 5 or not rp:
            continue
        out.append((_unescape(lp[4]), rp[0], _unescape(lp[3])))
    return out


def container_evidence(root: str = "/") -> Optional[str]:
    """Why we think we run in a container (``None``: no evidence)."""
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    if os.path.exists(j(".dockerenv")):
        return "/.dockerenv exists"
    if os.path.exists(j("run", ".containerenv")):
        return "/run/.containerenv exists"
    cg = _read(j("proc", "1", "cgroup")) + _read(j("proc", "self", "cgroup"))
    for word in ("docker", "kubepods", "containerd", "libpod", "lxc"):
        if word in cg:
            return f"/proc/1/cgroup mentions {word}"
    for mp, fstype, _ in parse_mountinfo(_read(j("proc", "self", "mountinfo"))):
        if mp == "/" and fstype in ("overlay", "aufs"):
            return f"the root file system is {fstype} (/proc/self/mountinfo)"
    return None


def mount_of(path: str, mounts: List[Tuple[str, str, str]]) -> Optional[Tuple[str, str, str]]:
    best = None
    for m in mounts:
        mp = m[0].rstrip("/") or "/"
        if path == mp or path.startswith(mp.rstrip("/") + "/") or mp == "/":
            if best is None or len(mp) > len(best[0].rstrip("/") or "/"):
                best = m
    return best


def on_bind_mount(path: str, root: str = "/") -> bool:
    """Whether ``path`` lives on a mount the host can see (not the container's own root or a tmpfs)."""
    m = mount_of(path, parse_mountinfo(_read(os.path.join(root, "proc", "self", "mountinfo"))))
    if m is None:
        return False
    mp, fstype, _ = m
    return (mp.rstrip("/") or "/") != "/" and fstype not in _VIRTUAL_FS


def container_path_warning(arg: str, path: str, flag: str = "--output", root: str = "/") -> Optional[str]:
    """The Symptom 3 warning for an absolute output path outside any bind mount in a container."""
    if not os.path.isabs(os.path.expanduser(arg)):
        return None
    why = container_evidence(root)
    if why is None or on_bind_mount(path, root):
        return None
    return (f"WARNING: running inside a container ({why}) and {flag} {path} is not on a bind mount: "
            "the file stays inside the container and is lost with `docker run --rm`. Use a relative path "
            "below a bind-mounted working directory instead, e.g. `docker run -v $(pwd):/workdir/code "
            f"-w /workdir/code ... lvsa generate {flag} outputs/{os.path.basename(path)}`, then "
            "`chown -R $(id -u):$(id -g) outputs` on the host")


# ============================================================== files
def _tmp_name(final: str, suffix: str) -> str:
    d, base = os.path.split(final)
    return os.path.join(d, f".{base}.lvsa-tmp-{os.getpid()}{suffix}")


def save_latent_atomic(path: str, payload: Dict[str, Any]) -> None:
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path, ".pt")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_mp4_atomic(path: str, video, fps: int) -> None:
    """``video``: float ``[F, H, W, 3]`` in [0, 1] → H.264 mp4, via a temporary file in the same directory."""
    import imageio
    import numpy as np

    frames = (np.clip(np.asarray(video, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path, ".mp4")
    try:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                ffmpeg_log_level="error") as w:
            for f in frames:
                w.append_data(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def _peak_memory(device) -> str:
    from .devices import memory_stats

    st = memory_stats(device)
    if st is not None:
        return f"{st['device_kind']}:{st['index']} peak allocated {st['peak'] / 1e9:.2f}GB"
    import resource

    return f"cpu (process peak RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB"


def _reset_peak(device) -> None:
    from .devices import reset_peak_memory

    try:
        reset_peak_memory(device)
    except Exception:  # noqa: BLE001 - a statistic, never fatal
        pass


def decode_to_mp4(cmd: str, pipe, adapter, latent, out_path: str, fps: int, latent_path: str,
                  num_frames: Optional[int] = None) -> int:
    """VAE decode + mp4; an out-of-memory decode keeps the latent and says how to finish."""
    import torch

    try:
        with torch.no_grad():
            video = adapter.decode(pipe, latent, num_frames=num_frames)
    except BaseException as e:  # OOM is reported; anything else re-raised, the latent named first
        if not _is_oom(e):
            _err(cmd, f"the VAE decode failed ({type(e).__name__}); the denoised latent is kept at "
                      f"{latent_path}: finish with  lvsa decode {latent_path}")
            raise
        _err(cmd, f"the VAE decode ran out of memory ({type(e).__name__}). Your denoised latent is safe at "
                  f"{latent_path}. Decode it later, on this or a larger device (VAE tiling is on by default):\n"
                  f"    lvsa decode {latent_path}" + (f" --output {out_path}" if out_path else ""))
        return EXIT_DECODE_OOM
    t = time.perf_counter()
    write_mp4_atomic(out_path, video, fps)
    # the line the troubleshooting guide (Symptom 3) tells users to look for
    print(f"[export] {out_path} ({time.perf_counter() - t:.1f}s)", file=sys.stderr, flush=True)
    return 0


# ============================================================== generate
def _settings(args) -> Dict[str, Any]:
    s = {"backend": args.backend, "sparsity_scale": args.sparsity_scale,
         "reference_latent_frames": args.reference_latent_frames, "riflex": args.riflex or None,
         "context_parallel": getattr(args, "context_parallel", None)}
    return {k: v for k, v in s.items() if v is not None}


def run_generate(args) -> int:
    from .devices import default_device_kind
    from .parallel import command_session

    kind = torch_device_kind(args.device) if args.device else default_device_kind()
    # under torchrun: the process group for the device kind, cuda:LOCAL_RANK, only rank 0
    # prints and writes, destroy_process_group always (one place: lvsa.parallel)
    with command_session(kind) as dist:
        try:
            return _generate(args, dist)
        except UserError as e:
            _err("generate", str(e))
            return EXIT_BAD_INPUT


def torch_device_kind(spec: str) -> str:
    try:
        import torch
        return torch.device(spec).type
    except RuntimeError as e:
        raise UserError(f"--device {spec}: {e}") from None


def _generate(args, dist=None) -> int:
    t_start = time.perf_counter()
    spec = resolve_model(args.model)
    from .tiny import TINY_CALL_KWARGS, TINY_DEFAULTS

    tiny_defaults = TINY_DEFAULTS[spec.family] if spec.tiny else {}
    num_frames = args.num_frames if args.num_frames is not None else tiny_defaults.get("num_frames")
    height = args.height if args.height is not None else tiny_defaults.get("height")
    width = args.width if args.width is not None else tiny_defaults.get("width")
    steps = args.steps if args.steps is not None else tiny_defaults.get("num_inference_steps")

    # ---- every check before anything heavy or anything written
    settings = _settings(args)
    if not args.no_lvsa:
        from .config import Config
        try:
            Config.load(**settings)
            if args.backend:
                from .plugins import get_backend
                get_backend(args.backend)  # unknown names fail here, before any loading
        except ValueError as e:
            raise UserError(str(e)) from None
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
                _note("generate", w)
    device, dtype = _device_and_dtype(args, spec.tiny)
    if dist is not None and dist.active and dist.device is not None:
        device = dist.device  # each rank on its own device (cuda:LOCAL_RANK)

    if spec.tiny:
        _note("generate", f"no --model given: using the built-in {spec.name} pipeline (random weights, offline "
                          "tokenizer). It makes NOISE, not a video of your prompt: it shows lvsa working end to "
                          "end. For real output pass --model /path/to/a/diffusers/pipeline/directory."
              if args.model is None else
              f"{spec.name} is a built-in tiny model with random weights: the output is noise.")

    # ---- load and enable
    import torch

    from . import integrations
    from .integrations.registry import adapter_for_family

    adapter = adapter_for_family(spec.family)
    pipe = load_pipeline(spec, device, dtype)
    if args.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    if args.no_lvsa:
        if settings:
            _note("generate", f"--no-lvsa: ignoring {', '.join(sorted(settings))}")
    else:
        try:
            integrations.enable(pipe, **settings)
        except ValueError as e:
            raise UserError(str(e)) from None
    pipe.set_progress_bar_config(desc="denoising", unit="step", leave=True)

    call: Dict[str, Any] = dict(TINY_CALL_KWARGS[spec.family]) if spec.tiny else {}
    for k, v in (("num_frames", num_frames), ("height", height), ("width", width),
                 ("num_inference_steps", steps), ("negative_prompt", args.negative_prompt)):
        if v is not None:
            call[k] = v
    if args.guidance_scale is not None:
        if spec.family == "hunyuan":  # HunyuanVideo 1.5 takes guidance from its guider component
            pipe.guider.guidance_scale = args.guidance_scale
        else:
            call["guidance_scale"] = args.guidance_scale

    # ---- denoise
    _reset_peak(device)
    t0 = time.perf_counter()
    from .dispatch import BackendUnavailable

    try:
        with torch.no_grad():
            result = pipe(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed),
                          output_type="latent", **call)
    except BackendUnavailable as e:  # an explicit --backend that cannot run this problem
        raise UserError(str(e)) from None
    latent = result.frames if hasattr(result, "frames") else result[0]
    t_denoise = time.perf_counter() - t0
    if dist is not None and not dist.is_main:
        return 0  # every rank holds the whole latent; rank 0 writes it (and the video)
    summary = integrations.last_summary(pipe) if not args.no_lvsa else None
    fps = args.fps or adapter.fps
    T_tok, P_tok = adapter.latent_tokens(latent.shape, factors)
    if num_frames is None:  # the pipeline's own default (needed to undo CogVideoX 1.5 padding)
        import inspect
        default = inspect.signature(type(pipe).__call__).parameters.get("num_frames")
        num_frames = default.default if default is not None and isinstance(default.default, int) else None
    meta = {
        "format": LATENT_FORMAT, "family": spec.family, "pipeline_class": spec.pipeline_class,
        "model": spec.name if spec.tiny else spec.path, "prompt": args.prompt, "seed": args.seed,
        "num_frames": num_frames, "height": height, "width": width, "steps": steps, "fps": fps,
        "latent_shape": list(latent.shape), "latent_tokens": [T_tok, P_tok],
        "lvsa": (None if summary is None else {k: v for k, v in summary.items()
                                              if isinstance(v, (int, float, str, dict, type(None)))}),
    }
    # top-level num_frames as the troubleshooting guide shows ({"latent": tensor, "num_frames": 257, ...})
    save_latent_atomic(latent_path, {"latent": latent.detach().to("cpu"), "num_frames": num_frames,
                                     "metadata": meta})

    # ---- decode
    t1 = time.perf_counter()
    rc = 0
    if want_video:
        rc = decode_to_mp4("generate", pipe, adapter, latent, out_path, fps, latent_path, num_frames)
        if rc == 0 and not keep_latent:
            os.unlink(latent_path)
    t_decode = time.perf_counter() - t1

    # ---- summary
    _print_generate_summary(spec, summary, args.no_lvsa, T_tok, P_tok, latent.shape, t_start, t_denoise,
                            t_decode if want_video else None, device,
                            out_path if (want_video and rc == 0) else None,
                            latent_path if (keep_latent or rc) else None, meta)
    return rc


def _check_context_parallel(args, spec, factors, num_frames, height, width, settings, dist) -> None:
    """Under torchrun: the split must work before anything loads (the same check, and so the
    same exit status, on every rank; rank 0 alone prints it)."""
    from .config import Config
    from .parallel import divisibility_problem

    if args.no_lvsa:
        raise UserError("--no-lvsa under torchrun would run the whole dense generation on every rank; "
                        "run it as one process, or use diffusers' enable_parallelism for dense context parallelism")
    mode = settings.get("context_parallel")
    if mode is None:  # LVSA_CONTEXT_PARALLEL / LVSA_CONFIG, else auto under torchrun
        cfg = Config.load()
        mode = cfg.context_parallel if cfg.is_set("context_parallel") else "auto"
    if mode == "off":
        raise UserError("--context-parallel off under torchrun would run the whole generation on every rank; "
                        "launch one process instead")
    seq = None
    if num_frames and height and width:
        seq = (factors.latent_frames(num_frames) // factors.patch_t) * factors.patches_per_frame(height, width)
    heads = None
    if spec.path:
        heads = _read_json(os.path.join(spec.path, "transformer", "config.json")).get("num_attention_heads")
    problem = divisibility_problem(dist.world_size, seq, heads, mode)
    if problem:
        raise UserError(problem)
    settings["context_parallel"] = mode


def _print_generate_summary(spec, summary, no_lvsa, T, P, shape, t_start, t_denoise, t_decode, device,
                            out_path, latent_path, meta) -> None:
    lines = [f"lvsa generate: done in {time.perf_counter() - t_start:.1f}s (denoise {t_denoise:.1f}s"
             + (f", decode {t_decode:.1f}s)" if t_decode is not None else ", no decode)")]
    lines.append(f"  model:     {spec.name}" + (" (built-in tiny, random weights: noise)" if spec.tiny else ""))
    lines.append(f"  video:     {meta['num_frames'] or '(pipeline default)'} frames, latent {list(shape)}, "
                 f"T_lat={T} P={P}, {meta['steps'] or '(default)'} steps, seed {meta['seed']}")
    if no_lvsa:
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
    lines.append(f"  peak mem:  {_peak_memory(device)}")
    if latent_path:
        lines.append(f"  latent:    {latent_path}")
    if out_path:
        lines.append(f"  output:    {out_path}")
    print("\n".join(lines), flush=True)


# ============================================================== decode
def run_decode(args) -> int:
    try:
        return _decode(args)
    except UserError as e:
        _err("decode", str(e))
        return EXIT_BAD_INPUT


def load_latent_file(path: str) -> Dict[str, Any]:
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a latent written by lvsa generate ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "latent" not in data or data.get("metadata", {}).get("format") != LATENT_FORMAT:
        raise UserError(f"{path}: not a latent written by lvsa generate (expected a dict with 'latent' and "
                        f"metadata format {LATENT_FORMAT!r})")
    return data


def _decode(args) -> int:
    t_start = time.perf_counter()
    latent_file = os.path.abspath(os.path.expanduser(args.latent))
    data = load_latent_file(latent_file)
    meta = data["metadata"]
    spec = resolve_model(args.model or meta["model"])
    if spec.family != meta["family"]:
        raise UserError(f"--model {args.model}: a {spec.family} model cannot decode this {meta['family']} latent")
    out_arg = args.output or re.sub(r"(\.latent)?\.pt$", "", args.latent, flags=re.I) + ".mp4"
    out_path = resolve_output_path(out_arg, "--output", ".mp4")
    w = container_path_warning(out_arg, out_path)
    if w:
        _note("decode", w)
    device, dtype = _device_and_dtype(args, spec.tiny)

    from .integrations.registry import adapter_for_family

    adapter = adapter_for_family(spec.family)
    pipe = load_pipeline(spec, device, dtype, vae_only=True)
    tiling = not args.no_tiling and hasattr(pipe.vae, "enable_tiling")
    if tiling:
        pipe.vae.enable_tiling()
    _reset_peak(device)
    rc = decode_to_mp4("decode", pipe, adapter, data["latent"], out_path, args.fps or meta.get("fps") or adapter.fps,
                       latent_file, meta.get("num_frames"))
    if rc == 0:
        print(f"lvsa decode: done in {time.perf_counter() - t_start:.1f}s (VAE tiling {'on' if tiling else 'off'}; "
              f"peak mem {_peak_memory(device)})\n  output:    {out_path}", flush=True)
    return rc
