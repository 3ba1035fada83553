"""What ``lvsa generate`` and ``lvsa decode`` share: flag parsers, messages, the VAE
decode to mp4 and peak-memory reporting. Not a subcommand (no ``register``)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Optional, Tuple



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
from ._args import int_at_least, positive_int, seed_int  # noqa: E402,F401 - the same


def err(cmd: str, msg: str) -> None:
    print(f"lvsa {cmd}: error: {msg}", file=sys.stderr, flush=True)


def note(cmd: str, msg: str) -> None:
    print(f"lvsa {cmd}: {msg}", file=sys.stderr, flush=True)


def add_overwrite_arg(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: an existing file is kept and the new one "
                        "gets the next free numbered name, e.g. fox-1.mp4, with a line saying so)")


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


class RunState:
    """Where a generate/decode run is and which files it holds, for the one line an
    interrupt or a failure prints (what was kept, what was removed)."""

    def __init__(self, cmd: str, overwrite: bool = False):
        from ..outputs import Outputs

        self.cmd = cmd
        self.outs = Outputs(overwrite=overwrite, cmd=cmd)
        self.phase = "checking the inputs"
        self.rescue: Optional[Tuple[str, str]] = None  # (complete staged latent, visible name to keep it at)
        self.latent: Optional[str] = None  # a latent file the user has (written by this run, or decode's input)
        self.latent_written = False
        self.mp4: Optional[str] = None     # the video this run is writing

    def keep_rescue(self) -> Optional[str]:
        """Give the staged safety latent a visible name (never replacing a file); its path."""
        if self.rescue is not None:
            tmp, final = self.rescue
            self.rescue = None
            self.latent, self.latent_written = self.outs.place(tmp, final, overwrite=False), True
        return self.latent if self.latent_written else None

    def drop_rescue(self) -> None:
        if self.rescue is not None:
            self.outs.discard(self.rescue[0])
            self.rescue = None

    def how_to_decode(self, latent: str) -> str:
        return f"lvsa decode {latent}" + (f" --output {self.mp4}" if self.mp4 else "")

    def interrupted(self) -> int:
        """Ctrl-C: keep a complete latent, remove unfinished files, say both in one line; 130."""
        import signal

        try:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        kept = self.keep_rescue()
        removed = self.outs.discard_all()
        video = next((p for p in self.outs.placed.values() if p.lower().endswith(".mp4")), None)
        parts = [f"lvsa {self.cmd}: interrupted (Ctrl-C) while {self.phase}"]
        if video:  # past the finish line: nothing to recover
            parts.append(f"the video {video} is complete"
                         + (f", and so is the latent {kept}" if kept else ""))
        elif kept:
            parts.append(f"kept the denoised latent at {kept} (finish with: {self.how_to_decode(kept)})")
        elif self.latent:
            parts.append(f"the latent {self.latent} is untouched")
        else:
            parts.append("no latent was saved")
        parts.append("removed the unfinished " + ", ".join(removed) if removed else "nothing else was written")
        print("; ".join(parts), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED

    def failed(self, e: BaseException) -> None:
        """An unexpected error: keep a complete latent and name it before the traceback."""
        kept = self.keep_rescue()
        self.outs.discard_all()
        if kept:
            err(self.cmd, f"{self.phase} failed ({type(e).__name__}); the denoised latent is kept at {kept}: "
                          f"finish with  {self.how_to_decode(kept)}")


def run_command(cmd: str, body, args) -> int:
    """Run ``body(args, state)`` with the shared exit-code rules: bad input 2, Ctrl-C 130."""
    state = RunState(cmd, overwrite=getattr(args, "overwrite", False))
    try:
        return body(args, state)
    except UserError as e:
        state.outs.discard_all()
        err(cmd, str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return state.interrupted()
    except BaseException as e:
        state.failed(e)
        raise


def decode_to_mp4(state: RunState, pipe, adapter, latent, out_path: str, fps: int,
                  num_frames: Optional[int] = None) -> Tuple[int, Optional[str]]:
    """VAE decode, then the mp4 (staged, placed); ``(exit code, the mp4 written)``. An
    out-of-memory decode keeps the latent and says how to finish."""
    import torch

    from ..outputs import write_mp4

    state.phase, state.mp4 = "decoding the latent (VAE)", out_path
    try:
        with torch.no_grad():
            video = adapter.decode(pipe, latent, num_frames=num_frames)
    except Exception as e:  # noqa: BLE001 - OOM is reported here; anything else by run_command
        if not is_oom(e):
            raise
        kept = state.keep_rescue() or state.latent
        err(state.cmd, f"the VAE decode ran out of memory ({type(e).__name__}). Your denoised latent is safe at "
                       f"{kept}. Decode it later, on this or a larger device (VAE tiling is on by default):\n"
                       f"    {state.how_to_decode(kept)}")
        return EXIT_DECODE_OOM, None
    state.phase = "writing the mp4"
    t = time.perf_counter()
    tmp = state.outs.stage(out_path)
    write_mp4(tmp, video, fps)
    got = state.outs.place(tmp)
    # the line the troubleshooting guide (Symptom 3) tells users to look for
    print(f"[export] {got} ({time.perf_counter() - t:.1f}s)", file=sys.stderr, flush=True)
    return 0, got
