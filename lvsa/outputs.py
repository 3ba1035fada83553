"""The files a command writes: output paths, atomic latent/mp4 writes, the latent file format.

Every file is written to a temporary name in its final directory and renamed into place,
so a reader never sees half a file. torch, numpy and imageio are imported where used.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

from .errors import UserError

LATENT_FORMAT = "lvsa-latent/1"


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
