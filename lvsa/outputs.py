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
    return path  # an existing file there is never written into: see Outputs.place


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


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def _no_unsafe_advice(text: str) -> str:
    """torch's load errors advise ``weights_only=False``, which runs code from the file: never pass that on."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return "" if "weights_only" in text else first


def load_latent_file(path: str) -> Dict[str, Any]:
    """Read a latent written by ``lvsa generate`` (``torch.load(weights_only=True)``: tensors
    and plain data only) and check it against its own metadata; one message per problem."""
    import pickle
    import zipfile

    import torch

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != _ZIP_MAGIC:
        raise UserError(f"{path}: not a latent written by lvsa generate: not a torch file ({size} bytes that do "
                        "not start like the zip archive torch.save writes)")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: the file is incomplete ({size} bytes; the end of the archive, written last, "
                        "is missing): the run or the copy that wrote it was cut short. Copy it again, or "
                        "re-run lvsa generate with --output-latent")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds Python objects other than tensors and plain data. lvsa reads latents "
                        "only with torch.load(weights_only=True), which refuses them because loading them "
                        "could run code from the file; a latent written by lvsa generate never holds "
                        "any") from None
    except Exception as e:  # noqa: BLE001 - a damaged archive member, an unknown storage type, ...
        why = _no_unsafe_advice(str(e))
        raise UserError(f"{path}: damaged; torch cannot read it ({type(e).__name__}{': ' + why if why else ''}). "
                        "Copy it again, or re-run lvsa generate with --output-latent") from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or "latent" not in data or meta.get("format") != LATENT_FORMAT:
        raise UserError(f"{path}: not a latent written by lvsa generate (expected a dict with 'latent' and "
                        f"metadata format {LATENT_FORMAT!r})")
    latent = data["latent"]
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point() or latent.dim() != 5:
        what = (f"a {latent.dim()}-D {str(latent.dtype).replace('torch.', '')} tensor"
                if isinstance(latent, torch.Tensor) else type(latent).__name__)
        raise UserError(f"{path}: 'latent' is {what}; lvsa generate writes a 5-D floating-point tensor")
    recorded = meta.get("latent_shape")
    if recorded is not None and list(latent.shape) != list(recorded):
        raise UserError(f"{path}: the latent has shape {list(latent.shape)} but its metadata records "
                        f"latent_shape {list(recorded)}: the file was edited or its parts mixed up; "
                        "decoding it would give a wrongly sized video")
    if data.get("num_frames") != meta.get("num_frames"):
        raise UserError(f"{path}: num_frames {data.get('num_frames')} disagrees with the metadata's "
                        f"{meta.get('num_frames')}: the file was edited")
    bad = int((~torch.isfinite(latent)).sum())
    if bad:
        raise UserError(f"{path}: the latent has {bad} NaN/Inf values of {latent.numel()}: the denoising "
                        "diverged (try --dtype float32 or another backend) or the file is damaged; decoding "
                        "it would give a black video")
    return data


#: axis order of each family's denoised latent (as the pipelines return it with output_type="latent")
LATENT_LAYOUT = {"wan": "BCFHW", "hunyuan": "BCFHW", "cogvideox": "BFCHW"}


def check_latent_for_model(path: str, data: Dict[str, Any], spec, vae_config, factors) -> None:
    """The latent against the VAE that is to decode it: channels, frames, size."""
    from .integrations.base import cfg_get
    from .geometry import latent_frames

    latent, meta = data["latent"], data["metadata"]
    layout = LATENT_LAYOUT[spec.family]
    dims = dict(zip(layout, latent.shape))
    want_c = cfg_get(vae_config, "z_dim", None) or cfg_get(vae_config, "latent_channels", None)
    if want_c is not None and dims["C"] != want_c:
        raise UserError(f"{path}: the latent has {dims['C']} channels but the VAE of {spec.name} takes {want_c}: "
                        "it comes from another model (e.g. Wan 2.2 TI2V-5B's VAE has 48). Decode it with the "
                        "model that made it: --model DIR")
    nf = meta.get("num_frames")
    if isinstance(nf, int) and nf >= 1:
        try:
            want_f = latent_frames(nf, factors.vae_temporal)
        except ValueError as e:
            raise UserError(f"{path}: its metadata's num_frames: {e}") from None
        pad = factors.patch_t - 1  # CogVideoX 1.5 pads the latent to a multiple of patch_size_t
        if not want_f <= dims["F"] <= want_f + pad:
            raise UserError(f"{path}: the latent has {dims['F']} latent frames but num_frames {nf} needs {want_f} "
                            f"with {spec.name}'s VAE (x{factors.vae_temporal} in time): the metadata or the model "
                            "does not belong to this latent")
    for key, axis in (("height", "H"), ("width", "W")):
        px = meta.get(key)
        if isinstance(px, int) and px // factors.vae_spatial != dims[axis]:
            raise UserError(f"{path}: the latent is {dims[axis]} high/wide in latent pixels but {key} {px} needs "
                            f"{px // factors.vae_spatial} with {spec.name}'s VAE (x{factors.vae_spatial} in space): "
                            "the metadata or the model does not belong to this latent")
