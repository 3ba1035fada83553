"""Backend selection and the one place that decides fallback.

Selection precedence (highest first; documented in the README):

1. the ``backend=`` argument of :func:`lvsa.attention` / ``lvsa.enable`` / ``--backend``
2. the innermost :func:`use_backend` context manager
3. ``LVSA_BACKEND`` (or ``LVSA_CONFIG``'s ``backend``)
4. ``auto``: the registered backends ranked for the device kind (each declares its
   :attr:`~lvsa.backend.Backend.priority`; highest first, ties by name) are tried in
   turn; the first that supports the problem runs, every earlier refusal is recorded
   with its reasons. The core names no backend but the built-in ``reference`` (rank 0
   everywhere: the last resort).

A backend named explicitly (1–3) that cannot run raises :class:`BackendUnavailable`
listing its reasons: never a quiet substitute. A backend's output is checked (shape,
dtype, device, finite for finite inputs: :func:`check_output`) on its first use for each
problem and on every call under ``LVSA_CHECK=1``. In ``auto`` mode a backend that raises
while running, or fails that check, is replaced by the reference for that call, with a
``backend_error`` fallback event carrying the error, and is skipped for that problem from
then on; ``LVSA_STRICT=1``, or a backend chosen by name, raises instead (a failed check is
a :class:`~lvsa.errors.BackendOutputError` naming the backend).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import plugins, telemetry
from .backend import Problem
from .config import current_config
from .errors import BackendOutputError, BackendUnavailable, UnknownBackend  # noqa: F401
from .mask import BlockMask

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
        config = current_config()
    if config.backend and config.backend != "auto":
        return config.backend, config.sources.get("backend", "config")
    return "auto", "auto"


def auto_order(device_kind: str) -> List[str]:
    """Registered backends automatic selection tries on ``device_kind``, in order."""
    ranked = []
    for name, bk in plugins.backends().items():
        rank = bk.auto_rank(device_kind)
        if rank is not None:
            ranked.append((-rank, name))
    return [name for _, name in sorted(ranked)]


def explain(problem: Problem) -> Dict[str, List[str]]:
    """Every registered backend → its reasons for ``problem`` (empty = can run): the auto
    order first, then the backends auto never picks on this device."""
    bks = plugins.backends()
    order = auto_order(problem.device_kind)
    return {name: bks[name].not_supported_reasons(problem)
            for name in order + sorted(set(bks) - set(order))}


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
        reasons = bk.not_supported_reasons(problem)
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
            bk = bks[cand]
            reasons = bk.not_supported_reasons(problem)
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


#: the one plan cache: (backend, mask, problem) -> the backend's plan, least recently used
#: dropped first. A generation uses at most ``min(kfi, steps)`` masks per shape.
PLAN_CACHE_SIZE = 512
_plans: "OrderedDict[tuple, object]" = OrderedDict()
_plans_lock = threading.Lock()


def plan_for(backend, mask: BlockMask, problem: Problem):
    """``backend.plan(mask, problem)``, built once per distinct (backend, mask, problem)."""
    key = (backend, mask, problem)
    with _plans_lock:
        hit = _plans.get(key)
        if hit is not None:
            _plans.move_to_end(key)
            return hit
    t = time.perf_counter()
    handle = backend.plan(mask, problem)
    telemetry.emit("plan_built", backend=backend.name, offset=mask.offset, T=mask.num_frames,
                   seconds=time.perf_counter() - t)
    with _plans_lock:
        handle = _plans.setdefault(key, handle)
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return handle


#: (problem, backend) whose output passed :func:`check_output` once
_verified: set = set()


def check_output(backend, out, q, k, v, text_k=None, text_v=None) -> None:
    """Raise :class:`BackendOutputError` naming ``backend`` unless ``out`` has ``q``'s shape,
    dtype and device and, for finite inputs, only finite values.

    The dispatcher calls it on a backend's first use for each problem and on every call
    under ``LVSA_CHECK=1``. Non-finite output from non-finite inputs is not the backend's
    doing and passes (checked mode rejects such inputs before any backend runs).
    """
    import torch

    who = f"backend {backend.name!r} (from {getattr(backend, 'distribution', '?')})"
    if not isinstance(out, torch.Tensor):
        raise BackendOutputError(f"{who} returned {type(out).__name__}, not a tensor",
                                 backend.name)
    wrong = [f"{what} {got} (expected {want})" for what, got, want in (
        ("shape", tuple(out.shape), tuple(q.shape)), ("dtype", out.dtype, q.dtype),
        ("device", out.device, q.device)) if got != want]
    if wrong:
        raise BackendOutputError(f"{who} returned a tensor of " + ", ".join(wrong), backend.name)
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        inputs = [t for t in (q, k, v, text_k, text_v) if t is not None]
        if all(bool(torch.isfinite(t).all()) for t in inputs):
            bad = int((~finite).sum())
            raise BackendOutputError(
                f"{who} returned {bad} non-finite values (NaN/Inf) from finite inputs: the "
                f"backend is at fault, not the model", backend.name)


def run_attention(q, k, v, mask: BlockMask, text_k=None, text_v=None, scale=None,
                  backend: Optional[str] = None, config=None, origin: str = "lvsa.attention",
                  validated: bool = False, record: Optional[telemetry.Counts] = None, q_rows=None):
    """Validate, select, plan (cached) and run; the single fallback decision point.

    ``record``: the generation's :class:`~lvsa.telemetry.Counts` (the engine's), counted
    together with the session. ``q_rows=(lo, hi)``: ``q`` holds only query rows ``[lo, hi)``
    of the sequence (sequence parallelism); backends without ``supports_q_rows`` are passed
    over (or refuse, when named explicitly). Returns ``(out, backend_name, fell_back)``.
    """
    from .ops import validate_inputs

    config = config or current_config()
    if not validated:
        validate_inputs(q, k, v, mask, text_k, text_v, scale, check_finite=config.check, q_rows=q_rows)
    problem = Problem.from_tensors(q, k, mask, text_k, q_rows)
    sel = select_backend(problem, backend, config)
    try:
        handle = plan_for(sel.backend, mask, problem)
        out = sel.backend.run(handle, q, k, v, text_k, text_v, scale)
        key = (problem, sel.backend)
        if config.check or key not in _verified:
            check_output(sel.backend, out, q, k, v, text_k, text_v)
            _verified.add(key)
        telemetry.count_call("sparse", sel.name, record)
        return out, sel.name, False
    except Exception as e:  # noqa: BLE001 - decided below, never swallowed silently
        if not sel.auto or config.strict or sel.name == "reference":
            raise
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        # demote it for this problem: later calls select the next backend (and say so)
        # instead of paying for the same failure on every layer and step
        _runtime_failures[(problem, sel.name)] = msg
        _selection_cache.clear()
        telemetry.fallback(origin, "backend_error",
                           k.shape[1] + (0 if text_k is None else text_k.shape[1]), record,
                           warn=config.warn_fallback, backend=sel.name, error=repr(msg),
                           to="reference")
        ref = plugins.get_backend("reference")
        out = ref.run(plan_for(ref, mask, problem), q, k, v, text_k, text_v, scale)
        telemetry.count_call("sparse", "reference", record)
        return out, "reference", True


_env_checked: set = set()


def check_environment(env=None) -> Dict[str, Optional[str]]:
    """Warn once per environment about ``LVSA_*`` variables nothing reads (a misspelling
    silently ignored is a run with the wrong settings), naming the nearest known name.
    Known: the :class:`~lvsa.config.Config` variables, ``LVSA_CONFIG``,
    ``LVSA_LOAD_PLUGINS`` and every setting a registered backend or plugin declares.
    Returns the unknown names (→ nearest known name or ``None``)."""
    import os

    from .config import unknown_variables

    env = os.environ if env is None else env
    items = tuple(sorted((k, v) for k, v in env.items() if k.startswith("LVSA_")))
    key = (items, plugins.generation())
    if key in _env_checked:
        return {}
    _env_checked.add(key)
    unknown = unknown_variables(dict(items), plugins.declared_settings())
    for name, near in unknown.items():
        hint = f"did you mean {near}?" if near else "`lvsa info --vars` lists the known ones"
        telemetry.emit("warning", message=f"{name} is set but nothing in lvsa reads it (ignored); {hint}")
    return unknown


def check_requested(device=None, dtype=None, head_dim: int = 128, num_heads: int = 1,
                    num_kv_heads: Optional[int] = None, text_len: int = 0, batch: int = 1,
                    requested: Optional[str] = None, config=None) -> Optional[str]:
    """Check the backend a run will ask for by name, before anything heavy is loaded.

    The name comes by the usual precedence (``requested`` → :func:`use_backend` →
    ``LVSA_BACKEND``/``LVSA_CONFIG``). ``auto`` returns ``None`` (the reference always
    runs). A named backend returns its name when it can run attention of this kind on
    ``device`` (a ``torch.device`` or string, default: lvsa's default device), else raises
    :class:`UnknownBackend` (not registered; the message lists what is) or
    :class:`BackendUnavailable` (its reasons: missing package, device, dtype, head dim...).
    """
    import torch

    from .devices import compute_capability, default_device

    name, source = requested_backend(requested, config)
    if name == "auto":
        return None
    bk = plugins.get_backend(name)
    dev = torch.device(device) if device is not None else default_device()
    problem = Problem(dev.type, dtype or torch.bfloat16, batch, 1, num_heads,
                      num_kv_heads or num_heads, head_dim, text_len=text_len, T=1, P=1,
                      compute_capability=compute_capability(dev) if dev.type == "cuda" else None,
                      device=dev)
    reasons = bk.not_supported_reasons(problem)
    if reasons:
        raise BackendUnavailable(
            f"backend {name!r} (selected by {source}) cannot run on {dev} "
            f"({str(problem.dtype).replace('torch.', '')}, head_dim={head_dim}): "
            + "; ".join(reasons) + ". Pick another backend or unset the selection to use auto.",
            {name: reasons})
    return name


def clear_caches():
    _selection_cache.clear()
    _runtime_failures.clear()
    _verified.clear()
    with _plans_lock:
        _plans.clear()
