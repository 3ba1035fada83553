"""Backend selection and the one place that decides fallback.

Selection precedence (highest first; documented in the README):

1. the ``backend=`` argument of :func:`lvsa.attention` / ``lvsa.enable`` / ``--backend``
2. the innermost :func:`use_backend` context manager
3. ``LVSA_BACKEND`` (or ``LVSA_CONFIG``'s ``backend``)
4. ``auto``: every registered backend that can run the problem (each refusal is
   recorded with its reasons) is a candidate; the cheapest one for this device and
   :class:`~lvsa.costs.ShapeClass` (mask density, heads, head dim, text) runs, by
   (a) the shipped cost table of the device (:mod:`lvsa.costs`), else (b) with
   ``LVSA_AUTOTUNE=1`` a short timed probe of each candidate on the first call of the
   class (cached on disk, ``LVSA_COST_CACHE``), else (c) the declared rank
   (:attr:`~lvsa.backend.Backend.priority`; highest first, ties by name). A backend that
   compiles and whose compile is not cached is passed over for a small problem
   (:data:`SMALL_FLOPS`) when a ready candidate exists. :attr:`Selection.why` says which
   rule decided. The core names no backend but the built-in ``reference`` (rank 0
   everywhere: the last resort).

A compiling backend's first use for a :meth:`~lvsa.backend.Backend.compile_key` prints
``[LVSA] compiling <backend> for <key>...`` and ``[LVSA] <backend> for <key> compiled in
N.Ns`` (``compile`` / ``compiled`` events).

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
import functools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from . import costs, plugins, telemetry
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
    #: why auto chose it: the cost table row, the probe result or the rank
    why: str = ""
    #: the shape class auto compared costs for
    shape: Optional[costs.ShapeClass] = None

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
#: (backend name, compile key) compiled in this process
_compiled: set = set()
#: (backend, problem) whose kernels are known built: runs skip the compile bookkeeping
_warm: set = set()
#: (backend name, compile key) -> seconds its first use took (compile included), this process
_compile_seconds: Dict[tuple, float] = {}


def compile_times() -> Dict[tuple, float]:
    """``(backend, compile key) -> seconds`` of every first use of a compiling backend in
    this process (benchmarks record them as cold-start seconds)."""
    return dict(_compile_seconds)

#: a problem below this many FLOPs (:func:`problem_flops`) is small: auto selection does
#: not make it wait on a backend's first compile when another candidate is ready
SMALL_FLOPS = 2e11
#: timed calls per candidate in an ``LVSA_AUTOTUNE`` probe (after one untimed call)
PROBE_ITERS = 2


def problem_flops(problem: Problem, density: Optional[float] = None) -> float:
    """FLOPs of one call: ``4 * B * H * query rows * attended keys * D``."""
    rows = problem.seq_len if problem.q_rows is None else problem.q_rows[1] - problem.q_rows[0]
    keys = problem.seq_len * (1.0 if density is None else density) + problem.text_len
    return 4.0 * problem.batch * problem.num_heads * rows * keys * problem.head_dim


def compile_ready(backend, problem: Problem) -> bool:
    """``backend`` runs ``problem`` without compiling first (it does not compile, compiled
    in this process, or its compile cache holds the kernels)."""
    if not backend.compiles or (backend.name, backend.compile_key(problem)) in _compiled:
        return True
    try:
        return backend.compile_cached(problem) is True
    except Exception as e:  # noqa: BLE001 - a cache probe must not break selection: say so
        telemetry.emit("warning", message=(
            f"{backend.name}.compile_cached() raised {type(e).__name__}: {e}; treated as not cached"))
        return False


def _device_name(problem: Problem) -> str:
    return costs.device_name(problem.device) if problem.device is not None else problem.device_kind


def rank_by_cost(problem: Problem, cls: costs.ShapeClass, cands: List[str], config,
                 probe=None) -> Tuple[List[str], str]:
    """``cands`` (in declared rank order) best first, and why: by the device's shipped
    cost table row for ``cls``; else with ``config.autotune`` by the cached probe, or by
    calling ``probe(cands) -> (ms, errors)`` and caching its result; else by rank."""
    dev = _device_name(problem)
    if len(cands) == 1:
        return list(cands), f"the only backend able to run it ({dev}, {cls})"
    row = costs.table_row(dev, cls) if cls.density != "?" else None
    note = ""
    if row is not None:
        measured = [c for c in cands if c in row["costs"]]
        if measured and cands[0] in row["costs"]:
            order = sorted(measured, key=lambda c: row["costs"][c]) + [c for c in cands if c not in measured]
            return order, (f"cost table {row['table']} ({dev}, {cls}): "
                           + ", ".join(f"{c} {row['costs'][c]:.3f}" for c in measured) + " x dense time")
        note = (f"; cost table {row['table']} has a row for {cls} but it lacks {cands[0]}, the first in "
                "rank (" + (", ".join(f"{c} {row['costs'][c]:.3f}" for c in measured) or "no candidate")
                + " x dense time)")
    if config.autotune and cls.density != "?":
        cache = costs.ProbeCache(config.cost_cache)
        try:
            entry = cache.get(dev, cls)
            if (entry is None or not all(c in entry["ms"] or c in entry["errors"] for c in cands)) \
                    and probe is not None:
                ms, errors = probe(cands)
                entry = cache.put(dev, cls, ms, errors, problem=_describe(problem))
        except (OSError, ValueError) as e:
            telemetry.emit("warning", message=f"LVSA_AUTOTUNE: probe cache unusable ({e}); "
                                              "selecting by rank")
            entry = None
        if entry is not None:
            timed = [c for c in cands if c in entry["ms"]]
            if timed:
                order = sorted(timed, key=lambda c: entry["ms"][c]) + [c for c in cands if c not in timed]
                why = (f"probe ({cache.path}, {dev}, {cls}): "
                       + ", ".join(f"{c} {entry['ms'][c]:.3g} ms" for c in timed))
                failed = [c for c in cands if c in entry["errors"]]
                return order, why + (f"; failed in the probe: {', '.join(failed)}" if failed else "")
        note += "; probe pending (the first call of this class probes)"
    elif cls.density != "?" and row is None:
        note += "; LVSA_AUTOTUNE=1 would probe"
    head = f"no cost table row for {dev}, {cls}" if row is None else f"{dev}"
    return list(cands), f"declared rank ({head}{note})"


def _describe(problem: Problem) -> str:
    return (f"{problem.device_kind} {str(problem.dtype).replace('torch.', '')} B={problem.batch} "
            f"T={problem.T} P={problem.P} H={problem.num_heads}/{problem.num_kv_heads} "
            f"D={problem.head_dim} text={problem.text_len}")


def select_backend(problem: Problem, requested: Optional[str] = None, config=None,
                   density: Optional[float] = None, probe=None) -> Selection:
    """The backend for ``problem`` (see the module docstring). ``density``: the mask's
    (it picks the cost table row); ``probe``: a callable timing candidates on the real
    inputs for ``LVSA_AUTOTUNE`` (:func:`run_attention` passes one)."""
    name, source = requested_backend(requested, config)
    if config is None:
        config = current_config()
    plugins.plugin_manager()
    cls = costs.shape_class(problem.num_heads, problem.head_dim, problem.text_len, density)
    key = (problem, cls, name, source, plugins.generation(), config.autotune, config.cost_cache)
    hit = _selection_cache.get(key)
    if hit is not None:
        return hit
    check_environment()  # a new decision: say once if an LVSA_* name nothing reads is set
    if name != "auto":
        bk = plugins.get_backend(name)
        reasons = bk.not_supported_reasons(problem)
        if reasons:
            raise BackendUnavailable(
                f"backend {name!r} (selected by {source}) cannot run this problem "
                f"({problem.device_kind}, {str(problem.dtype).replace('torch.', '')}, "
                f"head_dim={problem.head_dim}): " + "; ".join(reasons)
                + ". Pick another backend or unset the selection to use auto.", {name: reasons})
        sel = Selection(bk, source, False, why=f"named by {source}", shape=cls)
    else:
        refused: Dict[str, List[str]] = {}
        bks = plugins.backends()
        cands = []
        for cand in auto_order(problem.device_kind):
            reasons = bks[cand].not_supported_reasons(problem)
            failed = _runtime_failures.get((problem, cand))
            if failed:
                reasons = reasons + [f"raised at run time on this problem: {failed}"]
            if reasons:
                refused[cand] = reasons
            else:
                cands.append(cand)
        if not cands:
            raise BackendUnavailable(
                "no backend can run this problem: " + "; ".join(
                    f"{n}: {', '.join(r)}" for n, r in refused.items()), refused)
        order, why = rank_by_cost(problem, cls, cands, config, probe)
        best = order[0]
        if not compile_ready(bks[best], problem):
            flops = problem_flops(problem, density)
            ready = [c for c in order if compile_ready(bks[c], problem)]
            if ready and flops < SMALL_FLOPS:
                why += (f"; {best} passed over: its compile for {bks[best].compile_key(problem)} is not "
                        f"cached and this is a small run ({flops:.2g} FLOP < {SMALL_FLOPS:.2g}); "
                        f"{ready[0]} is ready (`lvsa warmup` builds {best} ahead)")
                best = ready[0]
        sel = Selection(bks[best], "auto", True, refused, why, cls)
        telemetry.emit("selection", backend=sel.name, device=problem.device_kind,
                       refused={k: v for k, v in refused.items()},
                       why=why if len(cands) > 1 else "", shape=str(cls))  # one candidate: no choice
    _selection_cache[key] = sel
    return sel


#: the one plan cache: (backend, mask, problem) -> the backend's plan, least recently used
#: dropped first. A generation uses at most ``min(kfi, steps)`` masks per shape.
PLAN_CACHE_SIZE = 512
_plans: "OrderedDict[tuple, object]" = OrderedDict()
_plans_lock = threading.Lock()


def plan_for(backend, mask: BlockMask, problem: Problem):
    """``backend.plan(mask, problem)``, built once per distinct (backend, mask, problem).

    Built in :func:`lvsa.ops.cacheable` (outside ``torch.inference_mode()``, without grad):
    a plan's tensors (gather indices, CSR) made under inference mode would be inference
    tensors, and once cached would fail a later forward under autograd (fine-tuning after
    generating) with "Inference tensors cannot be saved for backward". Normal tensors serve
    both modes."""
    # a plan does not depend on autograd (whether a backend may run under it is selection's
    # question): generation and a later fine-tuning forward share it
    key = (backend, mask, replace(problem, grad=False) if problem.grad else problem)
    with _plans_lock:
        hit = _plans.get(key)
        if hit is not None:
            _plans.move_to_end(key)
            return hit
    from .ops import cacheable

    t = time.perf_counter()
    with cacheable():
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


@functools.lru_cache(maxsize=1024)
def _density(mask: BlockMask) -> float:
    return mask.density()


def _run(backend, mask: BlockMask, problem: Problem, args):
    """Plan (cached) and run; a compiling backend's first use of a compile key is announced
    (``compile``/``compiled`` events) and timed, plan and kernel build included."""
    if (backend, problem) in _warm:  # the hot path: nothing left to compile
        return backend.run(plan_for(backend, mask, problem), *args)
    what = backend.compile_key(problem) if backend.compiles else None
    if what is None or (backend.name, what) in _compiled:
        _warm.add((backend, problem))
        return backend.run(plan_for(backend, mask, problem), *args)
    cached = compile_ready(backend, problem)
    if not cached:
        telemetry.emit("compile", backend=backend.name, shape=what)
    t = time.perf_counter()
    out = backend.run(plan_for(backend, mask, problem), *args)
    from .devices import synchronize

    synchronize(args[0].device)
    seconds = time.perf_counter() - t
    if not cached:
        telemetry.emit("compiled", backend=backend.name, shape=what, seconds=seconds)
    backend.mark_compiled(problem)
    _compiled.add((backend.name, what))
    _compile_seconds[(backend.name, what)] = seconds
    _selection_cache.clear()  # a small run may now take it
    return out


def _probe(names: List[str], mask: BlockMask, problem: Problem, args) -> Tuple[Dict[str, float], Dict[str, str]]:
    """``LVSA_AUTOTUNE``: each candidate once untimed (compiles, announced), then
    :data:`PROBE_ITERS` timed calls on the real inputs; ``(ms by backend, errors)``."""
    from .devices import synchronize

    bks = plugins.backends()
    ms, errors = {}, {}
    dev = args[0].device
    for name in names:
        bk = bks[name]
        try:
            _run(bk, mask, problem, args)
            handle = plan_for(bk, mask, problem)
            synchronize(dev)
            t = time.perf_counter()
            for _ in range(PROBE_ITERS):
                bk.run(handle, *args)
            synchronize(dev)
            ms[name] = (time.perf_counter() - t) / PROBE_ITERS * 1e3
        except Exception as e:  # noqa: BLE001 - recorded; selection passes it over
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    telemetry.emit("probe", device=_device_name(problem), ms=ms, errors=errors)
    return ms, errors


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
    problem = Problem.from_tensors(q, k, mask, text_k, q_rows, v=v, text_v=text_v)
    args = (q, k, v, text_k, text_v, scale)
    sel = select_backend(problem, backend, config, density=_density(mask),
                         probe=lambda names: _probe(names, mask, problem, args))
    try:
        out = _run(sel.backend, mask, problem, args)
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
    _env_checked.clear()
    _runtime_failures.clear()
    _compiled.clear()
    _warm.clear()
    _compile_seconds.clear()
    _density.cache_clear()
    _verified.clear()
    with _plans_lock:
        _plans.clear()
