"""The backend protocol: capabilities as attributes, refusals as reasons, plan/run.

A backend executes a :class:`~lvsa.mask.BlockMask`. It declares what it supports
as class attributes; :meth:`Backend.supports` turns them into a list of reasons
(empty = can run), each naming the actual and the allowed value. Backends
register through the ``lvsa_register_backends`` hook (see :mod:`lvsa.hookspecs`).

Tensors use the layout ``[B, S, H, D]`` (batch, tokens, heads, head dim); K/V may
have fewer heads than Q (GQA, ``H % Hkv == 0``); optional text K/V ``[B, L, Hkv, D]``
are attended by every video query.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Tuple

import torch

from .mask import BlockMask

ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Problem:
    """Everything a backend needs to decide whether it can run one attention call."""

    device_kind: str  # "cuda" | "npu" | "cpu" | other torch device types
    dtype: torch.dtype
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    text_len: int = 0
    T: int = 1
    P: int = 1
    compute_capability: Optional[Tuple[int, int]] = None
    device_index: Optional[int] = None
    #: query rows ``[lo, hi)`` of the video sequence when ``q`` holds only those (sequence
    #: parallelism); ``None`` = every row. ``seq_len`` is always the whole sequence (K/V).
    q_rows: Optional[Tuple[int, int]] = None

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    @classmethod
    def from_tensors(cls, q, k, mask: BlockMask, text_k=None, q_rows=None) -> "Problem":
        from .devices import compute_capability

        dev = q.device
        return cls(
            device_kind=dev.type, dtype=q.dtype, batch=q.shape[0], seq_len=k.shape[1],
            num_heads=q.shape[2], num_kv_heads=k.shape[2], head_dim=q.shape[3],
            text_len=0 if text_k is None else text_k.shape[1], T=mask.num_frames,
            P=k.shape[1] // max(mask.num_frames, 1),
            compute_capability=compute_capability(dev) if dev.type == "cuda" else None,
            device_index=dev.index,
            q_rows=None if q_rows is None else (int(q_rows[0]), int(q_rows[1])),
        )


class Backend:
    """Base class of every backend. Subclasses set the capability attributes and
    implement :meth:`run` (and, when it pays, :meth:`plan`)."""

    #: unique name users select with (``LVSA_BACKEND=name``)
    name: str = ""
    #: torch device types it runs on
    devices: Tuple[str, ...] = ("cpu", "cuda", "npu")
    dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES
    #: allowed head dims (``None`` = any up to ``max_head_dim``)
    head_dims: Optional[Tuple[int, ...]] = None
    max_head_dim: int = 1024
    supports_gqa: bool = True
    supports_text: bool = True
    #: runs a row range ``[lo, hi)`` of the queries against all K/V (sequence parallelism):
    #: ``plan`` receives it as ``problem.q_rows``, ``run`` gets ``q`` of ``hi - lo`` rows
    supports_q_rows: bool = False
    max_batch: Optional[int] = None
    min_compute_capability: Optional[Tuple[int, int]] = None
    #: importable modules it needs (checked with ``importlib.util.find_spec``)
    requires: Tuple[str, ...] = ()
    #: a one-line description for ``lvsa info``
    description: str = ""
    #: filled in at registration: the distribution that registered it
    distribution: str = "?"
    distribution_version: str = "?"

    # ------------------------------------------------------------ capabilities
    def missing_packages(self) -> List[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def availability_reasons(self) -> List[str]:
        """Reasons that hold whatever the problem (missing packages, no device)."""
        return [f"package {m!r} is not installed (pip install {m.replace('_', '-')})"
                for m in self.missing_packages()]

    def supports(self, problem: Problem) -> List[str]:
        """Reasons this backend cannot run ``problem``; empty when it can."""
        r = list(self.availability_reasons())
        if problem.device_kind not in self.devices:
            r.append(f"device is {problem.device_kind}, {self.name} runs on {'/'.join(self.devices)}")
        if problem.dtype not in self.dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            r.append(f"dtype is {str(problem.dtype).replace('torch.', '')}, allowed: {allowed}")
        if self.head_dims is not None and problem.head_dim not in self.head_dims:
            r.append(f"head_dim is {problem.head_dim}, allowed: {', '.join(map(str, self.head_dims))}")
        elif problem.head_dim > self.max_head_dim:
            r.append(f"head_dim is {problem.head_dim}, allowed: <= {self.max_head_dim}")
        if problem.gqa and not self.supports_gqa:
            r.append(f"GQA ({problem.num_heads} query heads, {problem.num_kv_heads} K/V heads) "
                     "is not supported: needs equal heads")
        if problem.text_len and not self.supports_text:
            r.append(f"text tokens ({problem.text_len}) are not supported: needs text_len 0")
        if problem.q_rows is not None and not self.supports_q_rows:
            r.append(f"query rows {list(problem.q_rows)} of {problem.seq_len} (sequence parallelism) are not "
                     "supported: needs every query row")
        if self.max_batch is not None and problem.batch > self.max_batch:
            r.append(f"batch is {problem.batch}, allowed: <= {self.max_batch}")
        if self.min_compute_capability and problem.device_kind == "cuda":
            cc = problem.compute_capability
            if cc is None or tuple(cc) < tuple(self.min_compute_capability):
                need = ".".join(map(str, self.min_compute_capability))
                have = ".".join(map(str, cc)) if cc else "unknown"
                r.append(f"compute capability is {have}, needs >= {need}")
        r.extend(self.extra_reasons(problem))
        return r

    def extra_reasons(self, problem: Problem) -> Iterable[str]:
        """Backend-specific refusals (override)."""
        return ()

    # ------------------------------------------------------------- execution
    def plan(self, mask: BlockMask, problem: Problem) -> Any:
        """Prepare to run ``mask`` on problems shaped like ``problem``; called once per
        distinct (mask, shape) and cached by the dispatcher. Default: the mask itself."""
        return mask

    def run(self, handle: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            text_k: Optional[torch.Tensor] = None, text_v: Optional[torch.Tensor] = None,
            scale: Optional[float] = None) -> torch.Tensor:
        """Block-sparse attention.

        Parameters
        ----------
        handle : object
            What :meth:`plan` returned.
        q : torch.Tensor
            ``[B, S, H, D]`` video queries, ``S = T * P``; with ``problem.q_rows = (lo, hi)``
            at plan time (backends with ``supports_q_rows``), ``[B, hi - lo, H, D]``: the
            query rows ``[lo, hi)`` (any range; frames may be cut).
        k, v : torch.Tensor
            ``[B, S, Hkv, D]``.
        text_k, text_v : torch.Tensor, optional
            ``[B, L, Hkv, D]``, attended densely by every query.
        scale : float, optional
            Softmax scale; default ``1/sqrt(D)``.

        Returns
        -------
        torch.Tensor
            ``[B, S, H, D]``, dtype of ``q``.
        """
        raise NotImplementedError(f"backend {self.name!r} does not implement run()")

    def __repr__(self):
        return f"<backend {self.name} from {self.distribution}>"
