"""The dense kernels both benches time, under one name each, and the choice of the fastest.

``lvsa bench attention`` times them as its ``--dense`` kernels (results ``dense_<name>``,
the ideal from the fastest); ``lvsa bench model`` probes them for its *best dense* row
(``dense_kernels_ms`` by name, ``dense_kernel`` the fastest). One name per kernel in both:
``cudnn`` and ``fa2`` (SDPA's cuDNN and FlashAttention-2 kernels, each forced), ``fa4``
(FlashAttention-4's dense forward), and ``sdpa`` (SDPA's default choice: bench attention
off CUDA). Result files of ``bench model`` from before the names were shared call
FlashAttention-2 ``flash``; :func:`canonical` reads them.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

#: name -> (column label, name in prose)
KERNELS: Dict[str, Tuple[str, str]] = {
    "cudnn": ("cuDNN", "cuDNN (SDPA)"),
    "fa2": ("FA2", "FlashAttention-2 (SDPA)"),
    "fa4": ("FA4 dense", "FlashAttention-4 dense"),
    "sdpa": ("SDPA", "SDPA (its default kernel)"),
}
#: the kernels one asks for (``bench attention --dense``): SDPA's forced ones, then FA4's
CHOICES = ("cudnn", "fa2", "fa4")
#: the SDPA kernels forced by name
SDPA_FORCED = ("cudnn", "fa2")
#: names in older results files
OLD_NAMES = {"flash": "fa2"}


def canonical(name: Optional[str]) -> Optional[str]:
    """The kernel's one name (a results file's older name read as today's)."""
    return OLD_NAMES.get(name, name) if name is not None else None


def prose(name: Optional[str]) -> Optional[str]:
    """The kernel's name in a sentence (``FlashAttention-2 (SDPA)``); an unknown name as given."""
    n = canonical(name)
    return KERNELS[n][1] if n in KERNELS else name


def _time(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0


def fastest(times: Mapping[str, Any]) -> Optional[str]:
    """The key of ``times`` with the smallest time (milliseconds; a string — why the kernel
    did not run — or ``None`` is no time); ``None`` when none was timed."""
    timed = {n: t for n, t in times.items() if _time(t)}
    return min(timed, key=timed.get) if timed else None


def sdpa_backend(name: str):
    """The ``torch.nn.attention.SDPBackend`` of SDPA kernel ``name`` (``cudnn``, ``fa2``)."""
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}[canonical(name)]


def sdpa_order(times: Mapping[str, Any]) -> List[Any]:
    """SDPA's priority list for a row: its forced kernels that were timed, fastest first,
    then the others (cuDNN, FlashAttention-2, memory-efficient, math)."""
    from torch.nn.attention import SDPBackend

    timed = sorted((t, canonical(n)) for n, t in times.items() if _time(t) and canonical(n) in SDPA_FORCED)
    order = [sdpa_backend(n) for _, n in timed]
    return order + [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b not in order]


def sdpa_call(name: str, q, k, v) -> Callable[[], Any]:
    """A call of SDPA on ``[B, S, H, D]`` tensors (GQA allowed) on kernel ``name``: ``cudnn``
    or ``fa2`` forced, ``sdpa`` SDPA's own choice. Returns ``[B, H, S, D]`` (not timed: the
    transposes are views)."""
    import torch.nn.functional as F

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kt.shape[1] != qt.shape[1]
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel

    which = sdpa_backend(name)

    def call():
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)

    return call
