"""The backend protocol: a backend describes itself, refuses with reasons, plans and runs.

A backend executes a :class:`~lvsa.mask.BlockMask`. It declares, as class attributes,
everything the core needs to know about it:

* what it runs: :attr:`~Backend.devices`, :attr:`~Backend.dtypes`,
  :attr:`~Backend.head_dims` / :attr:`~Backend.max_head_dim`, GQA, text tokens, batch,
  compute capability, the packages it :attr:`~Backend.requires`;
* its automatic-selection rank per device kind (:attr:`~Backend.priority`);
* how to install what it lacks (:attr:`~Backend.install_hint`);
* the ``LVSA_*`` variables it reads (:attr:`~Backend.settings`, listed by
  ``lvsa info --vars`` and validated like lvsa's own);
* the tolerances its outputs meet against float64 attention (:attr:`~Backend.tolerances`,
  checked by the conformance suite :mod:`lvsa.testing`);
* whether its first use compiles kernels (:attr:`~Backend.compiles`) and whether that
  compile is already cached for a problem (:meth:`~Backend.compile_cached`): the
  dispatcher announces a compile and auto selection avoids waiting on one for a tiny run.

:meth:`Backend.not_supported_reasons` turns the declarations into a list of reasons
(empty = can run), each naming the actual and the allowed value. Execution is strictly
two-phase: :meth:`Backend.plan` prepares a mask for one problem (the dispatcher calls it
once per distinct mask and shape and keeps the one plan cache), :meth:`Backend.run`
takes that plan only. Backends register through the ``lvsa_register_backends`` hook
(see :mod:`lvsa.hookspecs`).

Tensors use the layout ``[B, S, H, D]`` (batch, tokens, heads, head dim); K/V may
have fewer heads than Q (GQA, ``H % Hkv == 0``); optional text K/V ``[B, L, Hkv, D]``
are attended by every video query.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from .mask import BlockMask

ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Problem:
    """Everything a backend needs to decide whether it can run one attention call.

    ``device`` is the torch device of the tensors; ``device_kind`` and ``device_index``
    are its type and index (filled from ``device`` when given, and the other way round;
    ``device`` stays ``None`` for a device type this torch does not know).
    """

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
    device: Optional[torch.device] = None
    #: query rows ``[lo, hi)`` of the video sequence when ``q`` holds only those (sequence
    #: parallelism); ``None`` = every row. ``seq_len`` is always the whole sequence (K/V).
    q_rows: Optional[Tuple[int, int]] = None
    #: autograd records the call (grad mode on and q, k, v or the text K/V require grad):
    #: the output must carry their gradients (:attr:`Backend.grad_devices`)
    grad: bool = False

    def __post_init__(self):
        if self.device is None:
            try:
                dev = torch.device(self.device_kind if self.device_index is None
                                   else f"{self.device_kind}:{self.device_index}")
            except RuntimeError:  # a device type torch does not know yet (npu without torch_npu)
                dev = None
            object.__setattr__(self, "device", dev)
        else:
            dev = torch.device(self.device)
            object.__setattr__(self, "device", dev)
            object.__setattr__(self, "device_kind", dev.type)
            object.__setattr__(self, "device_index", dev.index)

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    @classmethod
    def from_tensors(cls, q, k, mask: BlockMask, text_k=None, q_rows=None, v=None, text_v=None) -> "Problem":
        from .devices import compute_capability

        dev = q.device
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, text_k, text_v))
        return cls(
            device_kind=dev.type, dtype=q.dtype, batch=q.shape[0], seq_len=k.shape[1],
            num_heads=q.shape[2], num_kv_heads=k.shape[2], head_dim=q.shape[3],
            text_len=0 if text_k is None else text_k.shape[1], T=mask.num_frames,
            P=k.shape[1] // max(mask.num_frames, 1),
            compute_capability=compute_capability(dev) if dev.type == "cuda" else None,
            device_index=dev.index, device=dev,
            q_rows=None if q_rows is None else (int(q_rows[0]), int(q_rows[1])), grad=grad,
        )


#: default output tolerances ``(atol, rtol)`` against float64 attention, by dtype
DEFAULT_TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


class Backend:
    """Base class of every backend. Subclasses set the declarations and implement
    :meth:`run` (and, when it pays, :meth:`plan`)."""

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
    #: device kinds where its output carries gradients to q, k, v (and the text K/V) under
    #: autograd; elsewhere a problem with ``grad`` is refused, never run without them
    #: (a kernel with no backward would return an output that silently stops gradients)
    grad_devices: Tuple[str, ...] = ()
    min_compute_capability: Optional[Tuple[int, int]] = None
    #: importable modules it needs (checked with ``importlib.util.find_spec``)
    requires: Tuple[str, ...] = ()
    #: how to get what it needs, e.g. ``"pip install lvsa-cuda[flashinfer]"``
    #: (used in the reasons for a missing package; default ``pip install <package>``)
    install_hint: str = ""
    #: automatic-selection rank per device kind: higher is tried first. ``None`` ranks it
    #: :data:`DEFAULT_PRIORITY` on each of its :attr:`devices`; a device kind missing from
    #: the dict means auto never picks it there (it still runs when named).
    priority: Optional[Dict[str, int]] = None
    #: the ``LVSA_*`` variables it reads (:class:`lvsa.config.Setting`)
    settings: Tuple[Any, ...] = ()
    #: ``dtype -> (atol, rtol)`` its outputs meet against float64 masked attention
    tolerances: Dict[torch.dtype, Tuple[float, float]] = DEFAULT_TOLERANCES
    #: a one-line description for ``lvsa info``
    description: str = ""
    #: filled in at registration: the distribution that registered it
    distribution: str = "?"
    distribution_version: str = "?"

    #: its first use for a new kind of problem compiles kernels (JIT): the dispatcher prints
    #: ``[LVSA] compiling ...`` / ``... compiled in N.Ns`` and ``lvsa warmup`` builds ahead
    compiles: bool = False
    #: how to keep its compiled kernels across processes when :meth:`compile_cache_dir` is
    #: ``None`` (they live in memory only): ``lvsa warmup`` and ``lvsa info`` say it
    compile_cache_hint: str = ""
    #: a choice inside the backend's own code that changes its numbers (fa4: its mask_mod
    #: kind), recorded by ``lvsa bench`` beside the versions; "" when there is none
    variant: str = ""

    #: the rank of a backend that declares no :attr:`priority` (above the reference's 0)
    DEFAULT_PRIORITY = 10

    # ------------------------------------------------------------ capabilities
    def auto_rank(self, device_kind: str) -> Optional[int]:
        """Its rank in automatic selection on ``device_kind`` (``None``: never automatic)."""
        if self.priority is None:
            return self.DEFAULT_PRIORITY if device_kind in self.devices else None
        return self.priority.get(device_kind)

    def tolerance(self, dtype: torch.dtype) -> Tuple[float, float]:
        return self.tolerances.get(dtype, DEFAULT_TOLERANCES.get(dtype, (1e-2, 1e-2)))

    def setting(self, env: str, environ=None):
        """The parsed value of one of its declared :attr:`settings`."""
        for st in self.settings:
            if st.env == env:
                return st.read(environ)
        raise KeyError(f"backend {self.name!r} declares no setting {env!r}")

    def missing_packages(self) -> List[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def availability_reasons(self) -> List[str]:
        """Reasons that hold whatever the problem (missing packages, no device)."""
        return [f"package {m!r} is not installed "
                f"({self.install_hint or 'pip install ' + m.replace('_', '-')})"
                for m in self.missing_packages()]

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        """Reasons this backend cannot run ``problem``; empty when it can."""
        if type(self).supports is not Backend.supports:  # a backend written for the old name
            return list(self.supports(problem))
        return self._declared_reasons(problem)

    def _declared_reasons(self, problem: Problem) -> List[str]:
        r = list(self.availability_reasons())
        if problem.device_kind not in self.devices:
            r.append(f"device is {problem.device_kind}, {self.name} runs on {'/'.join(self.devices)}")
        if problem.dtype not in self.dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            r.append(f"dtype is {str(problem.dtype).replace('torch.', '')}, allowed: {allowed}")
        if problem.head_dim < 1:
            r.append(f"head_dim is {problem.head_dim}, allowed: >= 1")
        elif self.head_dims is not None and problem.head_dim not in self.head_dims:
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
        if problem.grad and problem.device_kind not in self.grad_devices:
            where = f" on {problem.device_kind}" if self.grad_devices else ""
            r.append(f"autograd is recording (q/k/v or the text K/V require grad) and {self.name} has no "
                     f"backward{where}: its output would carry no gradients. For inference run under "
                     "torch.no_grad() or torch.inference_mode(); to train through attention use a backend "
                     "with a backward (reference; flex on CUDA)")
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

    def supports(self, problem: Problem) -> List[str]:
        """Deprecated name of :meth:`not_supported_reasons` (it returns reasons, not a bool)."""
        warnings.warn("Backend.supports() is deprecated: call not_supported_reasons()",
                      DeprecationWarning, stacklevel=2)
        return self._declared_reasons(problem)

    def extra_reasons(self, problem: Problem) -> Iterable[str]:
        """Backend-specific refusals (override)."""
        return ()

    # ------------------------------------------------------------ compilation
    def compile_key(self, problem: Problem) -> str:
        """What its compiled kernels are specialised on (one compile per distinct key):
        by default dtype, head dim, text or not, GQA or not."""
        return (f"{str(problem.dtype).replace('torch.', '')} head_dim={problem.head_dim}"
                + (" +text" if problem.text_len else "") + (" gqa" if problem.gqa else ""))

    def compile_cache_dir(self) -> Optional[str]:
        """The directory its compiler caches into (``None``: no on-disk cache known). lvsa
        leaves a marker there per :meth:`compile_key` once a compile succeeded, so clearing
        that cache also forgets the marker."""
        return None

    def _marker(self, problem: Problem) -> Optional[str]:
        import os
        import re

        d = self.compile_cache_dir()
        if not d:
            return None
        slug = re.sub(r"[^A-Za-z0-9=.+-]+", "_", f"{self.name}-{self.compile_key(problem)}")
        return os.path.join(d, "lvsa-compiled", slug)

    def compile_cached(self, problem: Problem) -> Optional[bool]:
        """Whether the kernels for ``problem`` are compiled and cached on disk: ``True``,
        ``False``, or ``None`` when it cannot tell. Backends that do not compile: ``True``."""
        if not self.compiles:
            return True
        import os

        marker = self._marker(problem)
        return None if marker is None else os.path.exists(marker)

    def mark_compiled(self, problem: Problem) -> None:
        """Record that the kernels for ``problem`` compiled (called by the dispatcher after
        a first run succeeded; best effort)."""
        import os

        marker = self._marker(problem) if self.compiles else None
        if marker is None:
            return
        try:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as fh:
                fh.write(f"{self.distribution} {self.distribution_version}\n")
        except OSError as e:  # the run goes on; the next process will compile (and say so) again
            import warnings
            warnings.warn(f"lvsa: cannot write the compile marker {marker} ({e}): {self.name} will be "
                          "treated as not compiled in the next process", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------- execution
    def plan(self, mask: BlockMask, problem: Problem) -> Any:
        """Prepare to run ``mask`` on problems shaped like ``problem`` (on
        ``problem.device``). Called once per distinct (mask, shape); the dispatcher
        caches the result. Default: the mask itself."""
        return mask

    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            text_k: Optional[torch.Tensor] = None, text_v: Optional[torch.Tensor] = None,
            scale: Optional[float] = None) -> torch.Tensor:
        """Block-sparse attention.

        Parameters
        ----------
        plan : object
            What :meth:`plan` returned (never a raw mask: plan first).
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
