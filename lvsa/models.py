"""Which model a command runs, and loading it: local diffusers directories and the tiny models.

Nothing here imports diffusers at module level: :func:`load_pipeline` imports it when a
pipeline is actually loaded, so ``import lvsa.models`` works with torch alone.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .errors import UserError
from .geometry import latent_frames, patches_per_frame

TINY_PREFIX = "tiny-"
PIPELINE_FAMILIES = {"WanPipeline": "wan", "HunyuanVideo15Pipeline": "hunyuan", "CogVideoXPipeline": "cogvideox"}
_FAMILY_PIPELINE = {fam: cls for cls, fam in PIPELINE_FAMILIES.items()}


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


def resolve_model(arg: Optional[str], source: str = "--model", hint: str = "") -> ModelSpec:
    """The model named by ``arg`` (``None``: tiny-wan). ``source`` names where ``arg`` came
    from in messages (the flag, or the latent file's metadata); ``hint`` ends them."""
    from .tiny import FAMILIES

    if arg is None:
        arg = TINY_PREFIX + "wan"
    what = f"{source} {arg}"
    try:
        return _resolve(arg, what, FAMILIES)
    except UserError as e:
        raise UserError(f"{e}{hint}") from None


def _resolve(arg: str, what: str, FAMILIES) -> ModelSpec:
    if arg.startswith(TINY_PREFIX) and not os.path.isdir(arg):
        fam = arg[len(TINY_PREFIX):]
        if fam not in FAMILIES:
            raise UserError(f"{what}: unknown tiny model; choose from "
                            + ", ".join(TINY_PREFIX + f for f in FAMILIES))
        return ModelSpec(arg, fam, None, _FAMILY_PIPELINE[fam])
    path = os.path.abspath(os.path.expanduser(arg))
    if not os.path.isdir(path):
        raise UserError(f"{what}: no such directory ({path}). Pass a local diffusers pipeline "
                        "directory (saved with save_pretrained or downloaded beforehand; nothing is "
                        "downloaded), or tiny-wan / tiny-hunyuan / tiny-cogvideox")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise UserError(f"{what}: not a diffusers pipeline directory (no model_index.json in {path})")
    try:
        with open(index) as fh:
            cls = json.load(fh).get("_class_name", "?")
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: unreadable model_index.json ({e})") from None
    if cls not in PIPELINE_FAMILIES:
        raise UserError(f"{what}: holds a {cls}; lvsa generate runs the text-to-video pipelines "
                        f"{', '.join(PIPELINE_FAMILIES)} (for other pipelines use lvsa.enable(pipe) in Python)")
    return ModelSpec(os.path.basename(path.rstrip(os.sep)) or path, PIPELINE_FAMILIES[cls], path, cls)


def call_sizes(spec: ModelSpec, args):
    """``(num_frames, height, width, steps)``: the flags given, else the tiny model's defaults
    (``None`` for a real model: its pipeline's own defaults apply)."""
    from .tiny import TINY_DEFAULTS

    tiny = TINY_DEFAULTS[spec.family] if spec.tiny else {}
    return tuple(getattr(args, a) if getattr(args, a) is not None else tiny.get(k)
                 for a, k in (("num_frames", "num_frames"), ("height", "height"),
                              ("width", "width"), ("steps", "num_inference_steps")))


def read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _tiny_pipe(spec: ModelSpec):
    from .tiny import build

    if spec.prebuilt is None:
        spec.prebuilt = build(spec.family)
    return spec.prebuilt


def model_configs(spec: ModelSpec):
    """``(vae config, transformer config)`` without loading weights (the tiny model is built)."""
    if spec.tiny:
        from .integrations.base import transformers_of

        pipe = _tiny_pipe(spec)
        return pipe.vae.config, transformers_of(pipe)[0].config
    return (read_json(os.path.join(spec.path, "vae", "config.json")),
            read_json(os.path.join(spec.path, "transformer", "config.json")))


def model_factors(spec: ModelSpec):
    """The VAE/patch factors of a model, read from its config files (no weights loaded)."""
    from .integrations.registry import adapter_for_family

    return adapter_for_family(spec.family).factors(*model_configs(spec))


def check_geometry(num_frames: Optional[int], height: Optional[int], width: Optional[int], factors) -> None:
    """One clear message per bad value (frames off the VAE grid, sizes off VAE x patch)."""
    if num_frames is not None:
        try:
            latent_frames(num_frames, factors.vae_temporal)
        except ValueError as e:
            raise UserError(f"--num-frames {num_frames}: {e}") from None
    for flag, val, patch in (("--height", height, factors.patch_h), ("--width", width, factors.patch_w)):
        if val is None:
            continue
        unit = factors.vae_spatial * patch
        try:  # the other side at one unit: only this flag's value is judged
            patches_per_frame(val, unit, factors.vae_spatial, patch)
        except ValueError:
            lo = val // unit * unit
            raise UserError(f"{flag} {val} is not divisible by {unit} (VAE spatial factor {factors.vae_spatial} "
                            f"x patch size {patch}); nearest valid: {f'{lo} or {lo + unit}' if lo else unit}") from None


def device_and_dtype(device_arg: Optional[str], dtype_arg: str, tiny: bool):
    import torch

    from .devices import default_device

    try:
        device = torch.device(device_arg) if device_arg else default_device()
    except RuntimeError as e:
        raise UserError(f"--device {device_arg}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device_arg}: CUDA is not available on this machine")
    if dtype_arg == "auto":
        dtype = torch.float32 if (tiny or device.type == "cpu") else torch.bfloat16
    else:
        dtype = getattr(torch, dtype_arg)
    return device, dtype


def load_pipeline(spec: ModelSpec, device, dtype, vae_only: bool = False):
    import torch

    if spec.tiny:
        pipe, spec.prebuilt = _tiny_pipe(spec), None
        return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    import diffusers
    from diffusers import DiffusionPipeline

    skip = {}
    if vae_only:
        index = read_json(os.path.join(spec.path, "model_index.json"))
        skip = {k: None for k, v in index.items()
                if not k.startswith("_") and k not in ("vae", "scheduler") and isinstance(v, list)}
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
