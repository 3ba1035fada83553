"""Write the sample logs of ``lvsa doctor``'s tests from lvsa's own output.

Every ``*.log`` here named in :data:`SCENARIOS` is what ``lvsa generate`` prints (stdout
and stderr, in order) on a built-in tiny pipeline with the environment variables that
provoke one failure mode. Two modes cannot be provoked by a variable and are simulated
at the one point that decides them: ``decode-oom`` makes the VAE decode raise the
out-of-memory error a GPU raises, ``container-export`` makes lvsa's container check
report a container (and skips the 10 s CPU decode of noise). Everything else is the
real pipeline, the real lvsa and its real log lines.

The working directory of the runs is rewritten to ``/runs/doctor`` so the committed
files do not depend on the machine. ``tests/test_doctor.py`` runs this script again
and checks that lvsa still prints the same lines.

    python tests/data/doctor/make_logs.py [--out DIR] [NAME ...]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_DIR = "/runs/doctor"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

# name -> (lvsa generate arguments, LVSA_* environment, simulation or None)
SCENARIOS: Dict[str, Tuple[List[str], Dict[str, str], Optional[str]]] = {
    # a full run: sparse, decoded, exported; mask picture and step times on
    "healthy-wan": (["--model", "tiny-wan", "--steps", "2", "--output", "outputs/healthy.mp4"],
                    {"LVSA_MASK_LOG": "once", "LVSA_STEP_TIME_LOG": "1"}, None),
    # 81 frames = 21 latent frames = Wan's reference horizon: engaged, DENSE by design
    "dense-by-design-wan": (["--model", "tiny-wan", "--num-frames", "81", "--steps", "2",
                             "--output-latent", "outputs/dense.pt"], {}, None),
    # a P for 480x832 on a 64x64 video: no whole frames in the sequence
    "geometry-detect-wan": (["--model", "tiny-wan", "--steps", "2", "--output-latent", "outputs/geo.pt"],
                            {"LVSA_PATCHES_PER_FRAME": "1560"}, None),
    # the resolution variables for 480x832 on HunyuanVideo (joint text attention)
    "geometry-detect-hunyuan": (["--model", "tiny-hunyuan", "--steps", "1", "--output-latent", "outputs/geo-h.pt"],
                                {"LVSA_VIDEO_HEIGHT": "480", "LVSA_VIDEO_WIDTH": "832"}, None),
    # a frame count that does not divide the sequence
    "no-t-lat-wan": (["--model", "tiny-wan", "--steps", "2", "--output-latent", "outputs/ntl.pt"],
                     {"LVSA_TOTAL_LATENT_FRAMES": "7"}, None),
    # HunyuanVideo at its training length (129 frames = 33 latent) with Wan's reference 21
    "reference-mismatch-hunyuan": (["--model", "tiny-hunyuan", "--num-frames", "129", "--steps", "1",
                                    "--output-latent", "outputs/ref.pt"],
                                   {"LVSA_REFERENCE_LATENT_FRAMES": "21"}, None),
    # the deprecated schedule variables
    "deprecated-schedule-wan": (["--model", "tiny-wan", "--steps", "2", "--output-latent", "outputs/dep.pt"],
                                {"LVSA_SCHEDULE_START": "0.3", "LVSA_SCHEDULE_END": "0.9"}, None),
    # the VAE decode runs out of memory after denoising completed
    "decode-oom-cogvideox": (["--model", "tiny-cogvideox", "--steps", "2", "--output", "outputs/long.mp4"], {},
                             "decode-oom"),
    # an absolute output path inside a container
    "container-export-wan": (["--model", "tiny-wan", "--steps", "2", "--output", "ABS/out/fox.mp4"], {},
                             "container"),
    # every call falls back, with the fallback lines silenced: only the summary tells
    "silenced-fallbacks-wan": (["--model", "tiny-wan", "--steps", "1", "--output-latent", "outputs/sil.pt"],
                               {"LVSA_PATCHES_PER_FRAME": "1560", "LVSA_WARN_FALLBACK": "0"}, None),
    # a window below one latent frame: lvsa's own warning
    "window-below-latent-frame-wan": (["--model", "tiny-wan", "--steps", "1", "--output-latent", "outputs/w.pt"],
                                      {"LVSA_WINDOW_SIZE": "2"}, None),
    # the dense baseline: lvsa off on purpose
    "no-lvsa-wan": (["--model", "tiny-wan", "--steps", "2", "--no-lvsa", "--output-latent", "outputs/base.pt"],
                    {}, None),
}


def _fake_oom(self, pipe, latents, num_frames=None):
    import torch

    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 38.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
        "12.40 GiB is free.")


def _fake_decode(self, pipe, latents, num_frames=None):
    import numpy as np

    return np.zeros((num_frames or 1, 64, 64, 3), dtype=np.float32)


@contextlib.contextmanager
def _simulation(kind: Optional[str]):
    """Patch the one decision point of a simulated failure; restore it after."""
    import lvsa.container as gen  # the module that owns the container check
    from lvsa.integrations.registry import adapter_for_family

    saved: List[Tuple[object, str, object]] = []

    def patch(obj, name, value):
        saved.append((obj, name, obj.__dict__.get(name) if isinstance(obj, type) else getattr(obj, name)))
        setattr(obj, name, value)

    # the machine making the logs may itself be a container: only the container scenario says so
    patch(gen, "container_evidence", (lambda root="/": "/.dockerenv exists") if kind == "container"
          else (lambda root="/": None))
    patch(gen, "on_bind_mount", lambda path, root="/": False)
    if kind in ("decode-oom", "container"):
        for fam in ("wan", "hunyuan", "cogvideox"):
            patch(type(adapter_for_family(fam)), "decode", _fake_oom if kind == "decode-oom" else _fake_decode)
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is None and isinstance(obj, type):
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def _fresh_lvsa_state():
    """A new process's lvsa state: plugin manager (and its print-once sink), caches, counters."""
    from lvsa import api, dispatch, plugins, telemetry

    plugins.reset()
    dispatch.clear_caches()
    telemetry.reset_session()
    if hasattr(api, "_config_for") and hasattr(api._config_for, "cache_clear"):
        api._config_for.cache_clear()


def run_scenario(name: str, workdir: str) -> str:
    """Run one scenario in ``workdir``; return its log (stdout and stderr interleaved)."""
    from lvsa.cli import main

    argv, env, sim = SCENARIOS[name]
    # on the CPU everywhere, so a GPU machine writes the same lines as CI
    argv = [a.replace("ABS", workdir) for a in argv] + ["--device", "cpu"]
    old_env = {k: os.environ.get(k) for k in env}
    stale = [k for k in os.environ if k.startswith("LVSA_") and k not in env and k != "LVSA_CHECK"]
    removed = {k: os.environ.pop(k) for k in stale}
    os.environ.update(env)
    old_cwd = os.getcwd()
    buf = io.StringIO()
    try:
        os.chdir(workdir)
        _fresh_lvsa_state()
        with _simulation(sim), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(["generate"] + argv)
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.update(removed)
    text = buf.getvalue()
    text = text.replace(os.path.realpath(workdir), RUN_DIR).replace(workdir, RUN_DIR).replace(REPO, "/src/lvsa")
    head = " ".join(f"{k}={v}" for k, v in env.items())
    cmd = f"$ {head + ' ' if head else ''}lvsa generate {' '.join(argv).replace(workdir, RUN_DIR)}"
    return f"{cmd}\n{text}$ echo $?\n{rc}\n"


def make(names: List[str], out_dir: str) -> Dict[str, str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    written = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix="lvsa-doctor-") as work:
            log = run_scenario(name, work)
        path = os.path.join(out_dir, f"{name}.log")
        with open(path, "w") as fh:
            fh.write(log)
        written[name] = path
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE, help="directory for the .log files (default: next to this script)")
    ap.add_argument("names", nargs="*", help=f"scenarios (default: all): {', '.join(SCENARIOS)}")
    a = ap.parse_args(argv)
    unknown = [n for n in a.names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}")
    os.makedirs(a.out, exist_ok=True)
    for name, path in make(a.names or list(SCENARIOS), a.out).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
