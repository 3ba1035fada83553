"""Backend selection and the one place that decides fallback.

Selection precedence (highest first; documented in the README):

1. the ``backend=`` argument of :func:`lvsa.attention` / ``lvsa.enable`` / ``--backend``
2. the innermost :func:`use_backend` context manager
3. ``LVSA_BACKEND`` (or ``LVSA_CONFIG``'s ``backend``)
4. ``auto``: the first backend of :data:`AUTO_PRIORITY` for the device kind that
   supports the problem; every earlier refusal is recorded with its reasons.

A backend named explicitly (1–3) that cannot run raises :class:`BackendUnavailable`
listing its reasons: never a quiet substitute. In ``auto`` mode a backend that
raises while running is replaced by the reference for that call, with a fallback
event carrying the exception text; ``LVSA_STRICT=1`` re-raises instead.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import plugins, telemetry
from .backend import Problem
from .mask import BlockMask

#: Automatic order per device kind. Backends registered by other distributions and
#: not listed here are tried after the listed fast ones, before ``reference``.
#: CUDA order from the H200 measurements (benchmarks/results/attention-h200-*.md):
#: flashinfer is 7-13 % faster than triton at every T >= 41 and beats the reference at
#: every sparse shape (1.01-1.44x); triton needs no extra package and beats the reference
#: 1.23-1.30x at Wan 1.3B T81/T121/batch 2 and 1.11x at HunyuanVideo T65+text, but is
#: 3 % slower at Wan 14B T81 (40 heads) and at near-dense masks; flex (FlexAttention) is
#: slower than the reference at every measured shape, so it is never chosen
#: automatically (``backend="flex"`` still selects it).
AUTO_PRIORITY: Dict[str, Tuple[str, ...]] = {
    "cuda": ("flashinfer", "triton", "reference", "flex"),
    "npu": ("ascend", "reference"),
    "cpu": ("reference",),
}

PROVIDED_BY = {"triton": "lvsa-cuda", "flashinfer": "lvsa-cuda[flashinfer]", "flex": "lvsa-flex",
               "ascend": "lvsa-ascend", "reference": "lvsa"}


class UnknownBackend(ValueError):
    pass


class BackendUnavailable(RuntimeError):
    def __init__(self, message: str, refused: Dict[str, List[str]]):
        super().__init__(message)
        self.refused = refused


_ctx_backend: contextvars.ContextVar = contextvars.ContextVar("lvsa_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str):
    """Select a backend for the calls inside the ``with`` block."""
    token = _ctx_backend.set(name)
    try:
        yield
    finally:
        _ctx_backend.reset(token)


@dataclass(frozen=True)
class Selection:
    backend: object
    source: str  # "argument" | "context" | "LVSA_BACKEND" | "LVSA_CONFIG" | "auto"
    auto: bool
    refused: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.backend.name


def requested_backend(explicit: Optional[str] = None, config=None) -> Tuple[str, str]:
    """``(name, source)`` by the precedence above (``name`` may be ``"auto"``)."""
    if explicit:
        return explicit, "argument"
    ctx = _ctx_backend.get()
    if ctx:
        return ctx, "context"
    if config is None:
        from .api import current_config
        config = current_config()
    if config.backend and config.backend != "auto":
        return config.backend, config.sources.get("backend", "config")
    return "auto", "auto"


def auto_order(device_kind: str) -> List[str]:
    listed = list(AUTO_PRIORITY.get(device_kind, ("reference",)))
    extra = sorted(n for n in plugins.backends() if n not in set().union(*AUTO_PRIORITY.values()))
    if "reference" in listed:
        i = listed.index("reference")
        return listed[:i] + extra + listed[i:]
    return listed + extra


def explain(problem: Problem) -> Dict[str, List[str]]:
    """Every registered or expected backend → its reasons for ``problem`` (empty = can run)."""
    out: Dict[str, List[str]] = {}
    bks = plugins.backends()
    order = auto_order(problem.device_kind)
    known = set(bks).union(*AUTO_PRIORITY.values())
    for name in order + sorted(known - set(order)):
        bk = bks.get(name)
        out[name] = (bk.supports(problem) if bk is not None else
                     [f"not installed (pip install {PROVIDED_BY.get(name, name)})"])
    return out


_selection_cache: Dict[tuple, Selection] = {}
#: (problem, backend name) -> the error it raised; auto selection skips it from then on
_runtime_failures: Dict[tuple, str] = {}


def select_backend(problem: Problem, requested: Optional[str] = None, config=None) -> Selection:
    name, source = requested_backend(requested, config)
    plugins.plugin_manager()
    key = (problem, name, source, plugins.generation())
    hit = _selection_cache.get(key)
    if hit is not None:
        return hit
    if name != "auto":
        bk = plugins.get_backend(name)
        reasons = bk.supports(problem)
        if reasons:
            raise BackendUnavailable(
                f"backend {name!r} (selected by {source}) cannot run this problem "
                f"({problem.device_kind}, {str(problem.dtype).replace('torch.', '')}, "
                f"head_dim={problem.head_dim}): " + "; ".join(reasons)
                + ". Pick another backend or unset the selection to use auto.", {name: reasons})
        sel = Selection(bk, source, False)
    else:
        refused: Dict[str, List[str]] = {}
        bks = plugins.backends()
        sel = None
        for cand in auto_order(problem.device_kind):
            bk = bks.get(cand)
            if bk is None:
                refused[cand] = [f"not installed (pip install {PROVIDED_BY.get(cand, cand)})"]
                continue
            reasons = bk.supports(problem)
            failed = _runtime_failures.get((problem, cand))
            if failed:
                reasons = reasons + [f"raised at run time on this problem: {failed}"]
            if reasons:
                refused[cand] = reasons
                continue
            sel = Selection(bk, "auto", True, refused)
            break
        if sel is None:
            raise BackendUnavailable(
                "no backend can run this problem: " + "; ".join(
                    f"{n}: {', '.join(r)}" for n, r in refused.items()), refused)
        telemetry.emit("selection", backend=sel.name, device=problem.device_kind,
                       refused={k: v for k, v in refused.items()})
    _selection_cache[key] = sel
    return sel


def _plan(backend, mask: BlockMask, problem: Problem):
    shape_key = (problem.batch, problem.seq_len, problem.num_heads, problem.num_kv_heads,
                 problem.head_dim, problem.text_len, str(problem.dtype), problem.device_kind,
                 problem.device_index, problem.q_rows)
    return mask.cached(("plan", backend.name, id(backend), shape_key),
                       lambda: _timed_plan(backend, mask, problem))


def _timed_plan(backend, mask, problem):
    import time

    t = time.perf_counter()
    handle = backend.plan(mask, problem)
    telemetry.emit("plan_built", backend=backend.name, offset=mask.offset, T=mask.num_frames,
                   seconds=time.perf_counter() - t)
    return handle


def run_attention(q, k, v, mask: BlockMask, text_k=None, text_v=None, scale=None,
                  backend: Optional[str] = None, config=None, origin: str = "lvsa.attention",
                  validated: bool = False, q_rows=None):
    """Validate, select, plan (cached) and run; the single fallback decision point.

    ``q_rows=(lo, hi)``: ``q`` holds only query rows ``[lo, hi)`` of the sequence (sequence
    parallelism); backends without ``supports_q_rows`` are passed over (or refuse, when
    named explicitly).

    Returns ``(out, backend_name, fell_back)``.
    """
    from .api import current_config
    from .ops import validate_inputs

    config = config or current_config()
    if not validated:
        validate_inputs(q, k, v, mask, text_k, text_v, scale, check_finite=config.check, q_rows=q_rows)
    problem = Problem.from_tensors(q, k, mask, text_k, q_rows)
    sel = select_backend(problem, backend, config)
    try:
        handle = _plan(sel.backend, mask, problem)
        out = sel.backend.run(handle, q, k, v, text_k, text_v, scale)
        telemetry.count_call("sparse", sel.name)
        return out, sel.name, False
    except Exception as e:  # noqa: BLE001 - decided below, never swallowed silently
        if not sel.auto or config.strict or sel.name == "reference":
            raise
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        # demote it for this problem: later calls select the next backend (and say so)
        # instead of paying for the same failure on every layer and step
        _runtime_failures[(problem, sel.name)] = msg
        _selection_cache.clear()
        telemetry.emit("fallback", origin=origin, reason="backend_error",
                       seq_len=k.shape[1] + (0 if text_k is None else text_k.shape[1]),
                       backend=sel.name, error=repr(msg), to="reference", warn=config.warn_fallback)
        ref = plugins.get_backend("reference")
        out = ref.run(_plan(ref, mask, problem), q, k, v, text_k, text_v, scale)
        telemetry.count_call("sparse", "reference")
        return out, "reference", True


def clear_caches():
    _selection_cache.clear()
    _runtime_failures.clear()
