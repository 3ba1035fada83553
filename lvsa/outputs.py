"""The files a command writes: output paths, atomic latent/mp4 writes, the latent file format.

Every file is written to a temporary name in its final directory and renamed into place,
so a reader never sees half a file. torch, numpy and imageio are imported where used.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional

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


def numbered(path: str, n: int) -> str:
    """``outputs/fox.mp4`` → ``outputs/fox-2.mp4``; ``x.latent.pt`` → ``x-2.latent.pt``."""
    d, base = os.path.split(path)
    m = re.match(r"(?i)^(.*?)((?:\.latent)?\.[^.]+)$", base)
    stem, ext = (m.group(1), m.group(2)) if m and m.group(1) else (base, "")
    return os.path.join(d, f"{stem}-{n}{ext}")


class Outputs:
    """The files of one run. Each is written under a hidden name of its own in the final
    directory (``.fox.mp4.<random>.lvsa-staging.mp4``, created exclusively: never a name a
    user has, never shared with another run) and renamed into place once complete.

    :meth:`place` never replaces an existing file unless ``overwrite``: it takes the next
    free numbered name (``fox-1.mp4``) atomically (a hard link fails on an existing name,
    so two runs finishing at once get one name each) and says so. With ``overwrite`` the
    rename replaces, and of two runs finishing at once the last rename wins.
    """

    def __init__(self, overwrite: bool = False, cmd: str = "generate"):
        self.overwrite = overwrite
        self.cmd = cmd
        self.staged: Dict[str, str] = {}    # staging path -> the final path it is meant for
        self.placed: Dict[str, str] = {}    # final path asked for -> the path written

    def stage(self, final: str) -> str:
        """A new, empty staging file for ``final`` (same directory, same extension)."""
        d, base = os.path.split(final)
        os.makedirs(d, exist_ok=True)
        ext = os.path.splitext(base)[1]
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".lvsa-staging{ext}", dir=d)
        os.close(fd)
        self.staged[tmp] = final
        return tmp

    def place(self, tmp: str, final: Optional[str] = None, overwrite: Optional[bool] = None) -> str:
        """Move the complete staging file ``tmp`` to ``final`` (or the next free numbered name)."""
        final = final or self.staged[tmp]
        if self.overwrite if overwrite is None else overwrite:
            os.replace(tmp, final)
            got = final
        else:
            got = _link_no_replace(tmp, final)
            os.unlink(tmp)
        self.staged.pop(tmp, None)
        self.placed[final] = got
        if got != final:
            print(f"lvsa {self.cmd}: {final} already exists; wrote {got} instead (--overwrite replaces it)",
                  file=sys.stderr, flush=True)
        return got

    def discard(self, tmp: str) -> None:
        self.staged.pop(tmp, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    def discard_all(self) -> List[str]:
        """Remove every staging file still there; the paths removed."""
        gone = []
        for tmp in list(self.staged):
            if os.path.exists(tmp):
                gone.append(tmp)
            self.discard(tmp)
        return gone


def _link_no_replace(src: str, final: str) -> str:
    for n in range(0, 10000):
        cand = final if n == 0 else numbered(final, n)
        try:
            os.link(src, cand)  # atomic, fails on an existing name
            return cand
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: O_EXCL claims the name, then replace
            try:
                fd = os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            os.close(fd)
            shutil.copyfile(src, cand + ".lvsa-partial")
            os.replace(cand + ".lvsa-partial", cand)
            return cand
    raise UserError(f"{final}: 10000 numbered names are taken; pass --overwrite or another path")


def save_latent(path: str, payload: Dict[str, Any]) -> None:
    """``torch.save`` to ``path`` (a staging file) and flush it to disk."""
    import torch

    with open(path, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_mp4(path: str, video, fps: int) -> None:
    """``video``: float ``[F, H, W, 3]`` in [0, 1] → H.264 mp4 at ``path`` (a staging file)."""
    import imageio
    import numpy as np

    frames = (np.clip(np.asarray(video, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    w = imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                           ffmpeg_log_level="error")
    try:
        for f in frames:
            w.append_data(f)
    finally:  # also on an exception (imageio's `with` closes only on success): ffmpeg ends
        w.close()  # now, not at garbage collection, when it would write the file again


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
