"""What ``lvsa generate`` and ``lvsa decode`` share: flag parsers, messages, the VAE
decode to mp4 and peak-memory reporting. Not a subcommand (no ``register``)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Optional



def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked import, or a module stubbed out in sys.modules
        return False


#: modules of the ``diffusers`` extra these commands need (checked without importing them)
EXTRA_MODULES = ("diffusers", "transformers", "imageio", "imageio_ffmpeg")
_missing = [m for m in EXTRA_MODULES if not _installed(m)]
if _missing:  # lvsa/cli.py turns this into an install hint
    raise ImportError(f"{', '.join(_missing)} not installed")

EXIT_BAD_INPUT = 2
EXIT_DECODE_OOM = 3
EXIT_INTERRUPTED = 130

from ..errors import UserError  # noqa: E402,F401 - re-exported for the commands


def err(cmd: str, msg: str) -> None:
    print(f"lvsa {cmd}: error: {msg}", file=sys.stderr, flush=True)


def note(cmd: str, msg: str) -> None:
    print(f"lvsa {cmd}: {msg}", file=sys.stderr, flush=True)


def int_at_least(lo: int, what: str, hi: Optional[int] = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = lo - 1
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


positive_int = int_at_least(1, "a positive integer")


def add_device_args(p) -> None:
    p.add_argument("--device", default=None, metavar="DEV",
                   help="torch device (cuda, cuda:1, npu:0, cpu); default: the first GPU/NPU, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights/activations dtype; auto = bfloat16 on GPU/NPU, float32 on CPU and for "
                        "the tiny models (default: auto)")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def peak_memory(device) -> str:
    from ..devices import memory_stats

    st = memory_stats(device)
    if st is not None:
        return f"{st['device_kind']}:{st['index']} peak allocated {st['peak'] / 1e9:.2f}GB"
    import resource

    return f"cpu (process peak RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB"


def reset_peak(device) -> None:
    from ..devices import reset_peak_memory

    try:
        reset_peak_memory(device)
    except Exception:  # noqa: BLE001 - a statistic, never fatal
        pass


def decode_to_mp4(cmd: str, pipe, adapter, latent, out_path: str, fps: int, latent_path: str,
                  num_frames: Optional[int] = None) -> int:
    """VAE decode + mp4; an out-of-memory decode keeps the latent and says how to finish."""
    import torch

    from ..outputs import write_mp4_atomic

    try:
        with torch.no_grad():
            video = adapter.decode(pipe, latent, num_frames=num_frames)
    except BaseException as e:  # OOM is reported; anything else re-raised, the latent named first
        if not is_oom(e):
            err(cmd, f"the VAE decode failed ({type(e).__name__}); the denoised latent is kept at "
                     f"{latent_path}: finish with  lvsa decode {latent_path}")
            raise
        err(cmd, f"the VAE decode ran out of memory ({type(e).__name__}). Your denoised latent is safe at "
                 f"{latent_path}. Decode it later, on this or a larger device (VAE tiling is on by default):\n"
                 f"    lvsa decode {latent_path}" + (f" --output {out_path}" if out_path else ""))
        return EXIT_DECODE_OOM
    t = time.perf_counter()
    write_mp4_atomic(out_path, video, fps)
    # the line the troubleshooting guide (Symptom 3) tells users to look for
    print(f"[export] {out_path} ({time.perf_counter() - t:.1f}s)", file=sys.stderr, flush=True)
    return 0
