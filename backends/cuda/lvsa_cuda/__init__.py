"""lvsa-cuda: the CUDA backends of lvsa, registered through the ``lvsa`` entry points.

* ``triton`` (:mod:`lvsa_cuda.triton_backend`): a block-sparse flash-attention kernel
  written in Triton, driven by the BlockMask; compiles in seconds, no download.
* ``flashinfer`` (:mod:`lvsa_cuda.flashinfer_backend`): FlashInfer's
  ``BlockSparseAttentionWrapper`` with one block per latent frame (``pip install
  lvsa-cuda[flashinfer]``).
* ``fa4`` (:mod:`lvsa_cuda.fa4_backend`): FlashAttention-4's CuTe-DSL block-sparse
  forward over 128x128 tiles, Hopper/Blackwell (``pip install lvsa-cuda[fa4]``).

Importing this package imports none of triton, flashinfer or flash_attn; each backend
module explains itself through ``not_supported_reasons()`` when its package or GPU is
missing.
"""
import contextlib
import functools
import importlib
from typing import Optional

import torch

from lvsa.backend import Backend

__version__ = "0.1.0"


class CudaBackend(Backend):
    """What both CUDA backends support (Ampere or newer, bf16/fp16, head_dim 64/128,
    GQA, text tokens)."""

    devices = ("cuda",)
    dtypes = (torch.bfloat16, torch.float16)
    head_dims = (64, 128)
    supports_gqa = True
    supports_text = True
    min_compute_capability = (8, 0)
    #: (atol, rtol) against float64 attention, checked by ``python -m lvsa.testing``:
    #: float32 accumulation, rounded once to the output dtype
    tolerances = {torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def concrete_device(device) -> torch.device:
    """``device`` with its index: a bare ``cuda`` is the current CUDA device (plans and
    per-device buffers are keyed by the GPU they live on)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_guard(device):
    """Launch on ``device`` even when it is not the current CUDA device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_plan(name: str, plan_type: type, handle, q, k, batch: bool) -> None:
    """Refuse a ``run(handle, q, k, ...)`` whose ``handle`` is not this backend's plan, or
    whose tensors differ from what it was planned for (heads, K/V heads, head dim, dtype
    and, with ``batch``, the batch size): a plan reused on another shape would read
    wrong tables or memory instead of failing."""
    if not isinstance(handle, plan_type):
        raise TypeError(f"{name}.run() takes the {plan_type.__name__} from {name}.plan(mask, problem), "
                        f"got {type(handle).__name__}")
    B, _, H, D = q.shape
    got = ((B,) if batch else ()) + (H, k.shape[2], D, q.dtype)
    want = ((handle.batch,) if batch else ()) + (handle.num_heads, handle.num_kv_heads, handle.head_dim,
                                                 handle.dtype)
    if got != want:
        raise ValueError(
            f"{name} plan was made for " + (f"batch={handle.batch} " if batch else "")
            + f"heads={handle.num_heads}/{handle.num_kv_heads} head_dim={handle.head_dim} {handle.dtype}, "
            f"got q {tuple(q.shape)} {q.dtype} and k heads {k.shape[2]}")


@functools.lru_cache(maxsize=None)
def import_error(module: str) -> Optional[str]:
    """``None`` when ``module`` imports, else its error in one line (a broken install of a
    kernel library raises anything: a missing CUDA library, an ABI mismatch...)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {msg}"
    return None


@functools.lru_cache(maxsize=None)
def dist_version(*dists: str) -> str:
    """The installed version of the first of ``dists`` that is installed, else ``"?"``
    (part of a compile key: a new kernel library version compiles again)."""
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "?"
