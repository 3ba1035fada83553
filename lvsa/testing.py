"""The backend conformance suite: run any backend against lvsa's reference and float64 truth.

For plugin authors (and lvsa's own backends). Three ways to use it:

* command line: ``python -m lvsa.testing BACKEND [--device cuda] [--seed N]`` checks a
  registered backend and prints one line per case (exit 0: all pass, 1: a case failed,
  2: the backend is unknown or can run none of the cases here);
* pytest, one line in your test module::

      from lvsa.testing import conformance
      test_my_backend = conformance(MyBackend(), device="cuda")

  (one test per case; a case the backend declares it cannot run here is reported as a
  skip naming the backend's own reasons);
* Python: :func:`check_backend` returns a :class:`CaseResult` per case.

Each case draws fresh random inputs (the seed is printed for reproduction) on shapes
chosen to catch the usual kernel mistakes, within what the backend declares it supports
(dtypes, head dims, GQA, text tokens, batch): tokens per frame ``P`` that are a multiple
of no tile size, text tokens, GQA, batch > 1, dense/globals-only/rotated masks. For
every case:

1. the backend plans and runs; its output must have ``q``'s shape, dtype and device and
   be finite;
2. it must match lvsa's ``reference`` backend run in float64 on the same inputs within
   the tolerances the backend declares for the dtype (:attr:`lvsa.backend.Backend.tolerances`,
   ``|out - ref| <= atol + rtol * |ref|`` elementwise, as ``torch.allclose``);
3. the float64 reference itself must match dense float64 attention under the
   token-level mask (``1e-10``), so a wrong oracle cannot pass a wrong backend;
4. the same plan run again on new inputs must give the answer for the new inputs
   (a plan holds no data).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .backend import Backend, Problem
from .mask import BlockMask, dense_mask
from .ops import default_scale
from .schedule import plan_schedule

__all__ = ["Case", "CaseResult", "default_cases", "cases_for", "check_backend", "run_case",
           "dense_masked_attention", "conformance", "main"]

#: the float64 reference must match dense float64 attention this closely
ORACLE_TOL = 1e-10


@dataclass(frozen=True)
class Case:
    """One conformance case: shapes, dtype and the mask to run."""

    name: str
    T: int
    P: int
    H: int
    Hkv: int
    D: int
    B: int = 1
    L: int = 0
    dtype: torch.dtype = torch.float32
    mask: Callable[[], BlockMask] = None  # builds the mask
    scale: Optional[float] = None
    #: query rows ``[lo, hi)`` only (sequence parallelism; backends with ``supports_q_rows``)
    q_rows: Optional[Tuple[int, int]] = None

    def build_mask(self) -> BlockMask:
        return self.mask() if self.mask is not None else plan_schedule(self.T, 1, 1, 3).mask(1)


@dataclass
class CaseResult:
    case: Case
    status: str  # "pass" | "fail" | "refused"
    message: str = ""
    max_abs_err: Optional[float] = None
    seed: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def line(self) -> str:
        c = self.case
        shape = (f"B={c.B} T={c.T} P={c.P} H={c.H}/{c.Hkv} D={c.D} L={c.L} "
                 f"{str(c.dtype).replace('torch.', '')}")
        err = f" max|err|={self.max_abs_err:.2e}" if self.max_abs_err is not None else ""
        return f"{self.status.upper():<7} {c.name:<24} {shape}{err}" + (
            f"  -- {self.message}" if self.message else "")


# ------------------------------------------------------------------- truth
def dense_masked_attention(q, k, v, mask: BlockMask, text_k=None, text_v=None, scale=None):
    """Float64 dense attention under the token-level mask (small shapes only): the ground
    truth the reference backend is checked against."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    T = mask.num_frames
    P = S // T
    scale = default_scale(D) if scale is None else scale
    allowed = mask.to_dense("token", tokens_per_frame=P)
    q64, k64, v64 = (t.detach().double().cpu() for t in (q, k, v))
    if text_k is not None:
        k64 = torch.cat([k64, text_k.detach().double().cpu()], 1)
        v64 = torch.cat([v64, text_v.detach().double().cpu()], 1)
        allowed = torch.cat([allowed, torch.ones(S, text_k.shape[1], dtype=torch.bool)], 1)
    rep = H // Hkv
    k64 = k64.repeat_interleave(rep, 2)
    v64 = v64.repeat_interleave(rep, 2)
    s = torch.einsum("bshd,bthd->bhst", q64, k64) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhst,bthd->bshd", torch.softmax(s, -1), v64)


def _reference64(mask, q, k, v, tk, tv, scale):
    from .backends.reference import ReferenceBackend

    ref = ReferenceBackend()
    args = [t.detach().double().cpu() if t is not None else None for t in (q, k, v, tk, tv)]
    prob = Problem.from_tensors(args[0], args[1], mask, args[3])
    return ref.run(ref.plan(mask, prob), *args, scale)


# ------------------------------------------------------------------- cases
def default_cases() -> List[Case]:
    """The shapes every backend is tried on (filtered by what it declares)."""
    rot = lambda T, W=1, n=1, ref=3, off=1: (lambda: plan_schedule(T, W, n, ref).mask(off))  # noqa: E731
    return [
        Case("rotated", 6, 13, 2, 2, 16, mask=rot(6)),
        Case("ragged_P_text", 5, 37, 4, 4, 16, L=7, mask=rot(5, off=2)),
        Case("gqa", 7, 19, 4, 2, 16, mask=rot(7, W=1, n=1, ref=3, off=3)),
        Case("gqa_text_batch2", 6, 21, 4, 1, 16, B=2, L=5, mask=rot(6, off=0)),
        Case("batch2", 5, 11, 2, 2, 16, B=2, mask=rot(5, off=1)),
        Case("P1", 9, 1, 2, 2, 16, mask=rot(9, W=1, n=1, ref=4, off=2)),
        Case("globals_only", 6, 17, 2, 2, 16, L=3, mask=lambda: BlockMask(6, (0, 3), None)),
        Case("dense", 4, 15, 2, 2, 16, mask=lambda: dense_mask(4)),
        Case("custom_scale", 5, 9, 2, 2, 16, mask=rot(5, off=4), scale=0.37),
        Case("query_rows_text", 6, 13, 4, 2, 16, B=2, L=3, mask=rot(6, off=2), q_rows=(20, 51)),
    ]


def _fit_head_dim(backend: Backend, want: int) -> Optional[int]:
    if backend.head_dims:
        return min(backend.head_dims)
    return want if want <= backend.max_head_dim else None


def cases_for(backend: Backend, cases: Optional[Sequence[Case]] = None,
              dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Case]:
    """``cases`` (default :func:`default_cases`) for each dtype the backend declares,
    adapted to what it declares (head dim; GQA, text and batch > 1 cases dropped when it
    says it cannot)."""
    out = []
    for dt in dtypes or backend.dtypes:
        for c in cases or default_cases():
            if c.Hkv != c.H and not backend.supports_gqa:
                continue
            if c.L and not backend.supports_text:
                continue
            if backend.max_batch is not None and c.B > backend.max_batch:
                continue
            if c.q_rows is not None and not backend.supports_q_rows:
                continue
            D = _fit_head_dim(backend, c.D)
            if D is None:
                continue
            out.append(dataclasses.replace(
                c, name=f"{c.name}-{str(dt).replace('torch.', '')}", D=D, dtype=dt))
    return out


# --------------------------------------------------------------------- run
def _inputs(case: Case, device, gen: torch.Generator):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(case.dtype).to(device)

    S = case.T * case.P
    q, k, v = r(case.B, S, case.H, case.D), r(case.B, S, case.Hkv, case.D), r(case.B, S, case.Hkv, case.D)
    tk = tv = None
    if case.L:
        tk, tv = r(case.B, case.L, case.Hkv, case.D), r(case.B, case.L, case.Hkv, case.D)
    return q, k, v, tk, tv


def _compare(out, want, atol, rtol) -> tuple:
    diff = (out.detach().double().cpu() - want).abs()
    bound = atol + rtol * want.abs()
    return bool((diff <= bound).all()), float(diff.max()), float((diff - bound).max())


def run_case(backend: Backend, case: Case, device=None, seed: int = 0,
             ignore_device: bool = False) -> CaseResult:
    """Run one case (see the module docs for what is checked)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    mask = case.build_mask()
    q, k, v, tk, tv = _inputs(case, device, gen)
    rows = slice(*case.q_rows) if case.q_rows else slice(None)
    problem = Problem.from_tensors(q[:, rows], k, mask, tk, case.q_rows)
    reasons = backend.not_supported_reasons(problem)
    if ignore_device:
        reasons = [r for r in reasons if not r.startswith("device is ")
                   and not r.startswith("compute capability is")]
    if reasons:
        return CaseResult(case, "refused", "; ".join(reasons), seed=seed)
    atol, rtol = backend.tolerance(case.dtype)
    try:
        plan = backend.plan(mask, problem)
        out = backend.run(plan, q[:, rows], k, v, tk, tv, case.scale)
    except Exception as e:  # noqa: BLE001 - reported as the case's failure
        return CaseResult(case, "fail", f"raised {type(e).__name__}: {e}", seed=seed)
    if not isinstance(out, torch.Tensor):
        return CaseResult(case, "fail", f"run() returned {type(out).__name__}, not a tensor", seed=seed)
    for what, got, want in (("shape", tuple(out.shape), tuple(q[:, rows].shape)), ("dtype", out.dtype, q.dtype),
                            ("device", out.device, q.device)):
        if got != want:
            return CaseResult(case, "fail", f"output {what} is {got}, expected {want}", seed=seed)
    if not bool(torch.isfinite(out).all()):
        return CaseResult(case, "fail", "output holds NaN/Inf for finite inputs", seed=seed)
    ref = _reference64(mask, q, k, v, tk, tv, case.scale)
    truth = dense_masked_attention(q, k, v, mask, tk, tv, case.scale)
    oracle_err = float((ref - truth).abs().max())
    if oracle_err > ORACLE_TOL:
        return CaseResult(case, "fail", f"the float64 reference is off dense attention by "
                          f"{oracle_err:.2e} (lvsa bug: report it)", seed=seed)
    ok, err, excess = _compare(out, ref[:, rows], atol, rtol)
    if not ok:
        return CaseResult(case, "fail", f"differs from the float64 reference beyond the declared "
                          f"tolerance atol={atol:g} rtol={rtol:g} (by {excess:.2e})",
                          max_abs_err=err, seed=seed)
    # the plan holds no data: new inputs through the same plan give the new answer
    q2, k2, v2, tk2, tv2 = _inputs(case, device, gen)
    try:
        out2 = backend.run(plan, q2[:, rows], k2, v2, tk2, tv2, case.scale)
    except Exception as e:  # noqa: BLE001
        return CaseResult(case, "fail", f"second run on the same plan raised {type(e).__name__}: {e}",
                          seed=seed)
    ok2, err2, _ = _compare(out2, _reference64(mask, q2, k2, v2, tk2, tv2, case.scale)[:, rows], atol, rtol)
    if not ok2:
        return CaseResult(case, "fail", "the same plan run on new inputs gave a wrong answer "
                          "(does the plan keep tensors of the first call?)", max_abs_err=err2, seed=seed)
    return CaseResult(case, "pass", max_abs_err=max(err, err2), seed=seed)


def check_backend(backend: Backend, device=None, seed: Optional[int] = None,
                  cases: Optional[Sequence[Case]] = None, ignore_device: bool = False,
                  dtypes: Optional[Sequence[torch.dtype]] = None) -> List[CaseResult]:
    """Run every case of :func:`cases_for` on ``device``; ``seed`` default: fresh.

    ``ignore_device=True`` drops the device and compute-capability refusals, for running a
    device backend's code on CPU tensors under an emulator or interpreter (lvsa's own CI
    runs the Triton kernels with ``TRITON_INTERPRET=1`` and the Ascend backend on a CPU
    emulation of ``torch_npu``).
    """
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
    return [run_case(backend, c, device, seed + i, ignore_device)
            for i, c in enumerate(cases_for(backend, cases, dtypes))]


# ------------------------------------------------------------------ pytest
def conformance(backend: Backend, device=None, seed: Optional[int] = None,
                ignore_device: bool = False, dtypes: Optional[Sequence[torch.dtype]] = None,
                cases: Optional[Sequence[Case]] = None):
    """A pytest test function, one parametrized test per case::

        test_conformance = conformance(MyBackend(), device="cuda")
    """
    import pytest

    all_cases = cases_for(backend, cases, dtypes)
    base = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)

    @pytest.mark.parametrize("case", all_cases, ids=[c.name for c in all_cases])
    def test_conformance(case):
        res = run_case(backend, case, device, base + all_cases.index(case), ignore_device)
        if res.status == "refused":
            pytest.skip(f"{backend.name} declares it cannot run this here: {res.message}")
        assert res.ok, f"{backend.name}: {res.line()} (seed {res.seed})"

    return test_conformance


# --------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lvsa.testing",
        description="Check a registered lvsa backend against the reference and float64 "
                    "attention on ragged shapes (see lvsa.testing).")
    p.add_argument("backend", help="a registered backend name (lvsa info lists them)")
    p.add_argument("--device", default=None, help="torch device (default: lvsa's default device)")
    p.add_argument("--seed", type=int, default=None, help="first case's seed (default: fresh)")
    p.add_argument("--ignore-device", action="store_true",
                   help="run even where the backend refuses the device (emulators, TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    from . import plugins
    from .devices import default_device
    from .errors import LVSAError

    try:
        backend = plugins.get_backend(args.backend)
    except LVSAError as e:
        print(f"lvsa.testing: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else default_device()
    seed = int.from_bytes(os.urandom(4), "little") if args.seed is None else args.seed
    print(f"lvsa.testing: backend {backend.name} ({backend.distribution} "
          f"{backend.distribution_version}) on {device}, seed {seed}")
    results = check_backend(backend, device, seed, ignore_device=args.ignore_device)
    for r in results:
        print("  " + r.line())
    n = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "refused")}
    print(f"lvsa.testing: {n['pass']} passed, {n['fail']} failed, {n['refused']} refused")
    if n["fail"]:
        return 1
    return 0 if n["pass"] else 2


if __name__ == "__main__":
    sys.exit(main())
