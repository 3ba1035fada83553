"""The backend conformance suite (lvsa.testing) on lvsa's own backends, and proof that it
catches wrong backends.

Every backend runs the same cases (ragged P, text tokens, GQA, batch > 1, dense and
globals-only masks; fresh random inputs) against the float64 reference within the
tolerances it declares: the reference on the CPU, triton under TRITON_INTERPRET=1, flashinfer
against the CPU stand-in of its wrapper, flex with eager FlexAttention on the CPU, ascend on
the CPU emulation of torch_npu.
"""
import subprocess
import sys

import pytest
import torch

from ascend_emulation import emulated_npu  # noqa: F401 - fixture
from flashinfer_standin import fake_flashinfer  # noqa: F401 - fixture
from lvsa import testing
from lvsa.backends.reference import ReferenceBackend

test_reference_conformance = testing.conformance(ReferenceBackend(), device="cpu")


def _assert_all_pass(results):
    bad = [r.line() for r in results if r.status != "pass"]
    assert results and not bad, "\n".join(bad)


def test_triton_conformance_interpreted():
    from lvsa_cuda.triton_backend import TritonBackend
    # the interpreter is slow (test_triton_backend.py covers the kernel's modes): the cases
    # most unlike its own tests' shapes in float16, the text/GQA/batch one in bfloat16
    cases = {c.name: c for c in testing.default_cases()}
    _assert_all_pass(testing.check_backend(
        TritonBackend(), "cpu", ignore_device=True, dtypes=[torch.float16],
        cases=[cases[n] for n in ("ragged_P_text", "P1")]))
    _assert_all_pass(testing.check_backend(TritonBackend(), "cpu", ignore_device=True,
                                           dtypes=[torch.bfloat16], cases=[cases["gqa_text_batch2"]]))


def test_flashinfer_conformance_on_the_standin(fake_flashinfer, monkeypatch):
    import importlib.machinery

    from lvsa_cuda import flashinfer_backend as fb
    fake_flashinfer.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)
    monkeypatch.setattr(fb, "_import_error", lambda: None)
    _assert_all_pass(testing.check_backend(fb.FlashInferBackend(), "cpu", ignore_device=True))


def test_flex_conformance_eager_on_cpu():
    import lvsa_flex
    _assert_all_pass(testing.check_backend(lvsa_flex.FlexBackend(), "cpu", ignore_device=True,
                                           dtypes=[torch.float32]))


def test_ascend_conformance_on_the_emulation(emulated_npu):  # noqa: F811
    from lvsa_ascend.backend import AscendBackend
    _assert_all_pass(testing.check_backend(AscendBackend(), "cpu", ignore_device=True))


# ------------------------------------------------------------ it catches bugs
class _NoText(ReferenceBackend):
    name = "notext"

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        return super().run(plan, q, k, v, None, None, scale)  # forgets the text tokens


class _LastFrameWrong(ReferenceBackend):
    name = "lastframe"

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        out = super().run(plan, q, k, v, text_k, text_v, scale)
        out[:, -1] = 0  # the last token of a ragged frame tile left unwritten
        return out


class _WrongDtype(ReferenceBackend):
    name = "wrongdtype"

    def run(self, *a, **kw):
        return super().run(*a, **kw).double()


class _NaN(ReferenceBackend):
    name = "nan"

    def run(self, *a, **kw):
        out = super().run(*a, **kw)
        out[0, 0, 0, 0] = float("nan")
        return out


class _KeepsFirstInputs(ReferenceBackend):
    name = "stale"

    def plan(self, mask, problem):
        return {"groups": super().plan(mask, problem), "cached": None}

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        if plan["cached"] is None:
            plan["cached"] = super().run(plan["groups"], q, k, v, text_k, text_v, scale)
        return plan["cached"].clone()


@pytest.mark.parametrize("bad,why", [(_NoText(), "tolerance"), (_LastFrameWrong(), "tolerance"),
                                     (_WrongDtype(), "output dtype"), (_NaN(), "NaN"),
                                     (_KeepsFirstInputs(), "same plan")])
def test_the_suite_fails_a_wrong_backend(bad, why):
    results = testing.check_backend(bad, "cpu", dtypes=[torch.float32])
    failed = [r for r in results if r.status == "fail"]
    assert failed and all(why in r.message for r in failed), [r.line() for r in results]


def test_a_backend_declaring_loose_tolerances_in_half_precision_passes_and_strict_ones_fail():
    class Strict(ReferenceBackend):
        name = "strict"
        tolerances = {torch.bfloat16: (1e-6, 0.0)}

    res = testing.check_backend(Strict(), "cpu", dtypes=[torch.bfloat16])
    assert any(r.status == "fail" for r in res)   # bf16 is not exact: tolerances are declared
    _assert_all_pass(testing.check_backend(ReferenceBackend(), "cpu", dtypes=[torch.bfloat16]))


def test_declared_capabilities_shape_the_cases():
    class NoGqaNoText(ReferenceBackend):
        name = "plain"
        supports_gqa = False
        supports_text = False
        max_batch = 1
        head_dims = (32,)

    cases = testing.cases_for(NoGqaNoText(), dtypes=[torch.float32])
    assert cases and all(c.H == c.Hkv and c.L == 0 and c.B == 1 and c.D == 32 for c in cases)
    _assert_all_pass(testing.check_backend(NoGqaNoText(), "cpu", dtypes=[torch.float32]))


def test_the_oracle_is_checked_against_dense_attention():
    mask = testing.default_cases()[1].build_mask()
    g = torch.Generator().manual_seed(0)
    T, P, H, D, L = mask.num_frames, 37, 2, 8, 4
    q, k, v = (torch.randn(1, T * P, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    tk, tv = (torch.randn(1, L, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    truth = testing.dense_masked_attention(q, k, v, mask, tk, tv)
    ref = testing._reference64(mask, q, k, v, tk, tv, None)
    assert (truth - ref).abs().max() < testing.ORACLE_TOL
    assert (truth - testing.dense_masked_attention(q, k, v, mask)).abs().max() > 1e-3  # text matters


def test_command_line(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "lvsa.testing", "reference", "--device", "cpu",
                         "--seed", "7"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "backend reference (lvsa" in ok.stdout and "seed 7" in ok.stdout
    assert "0 failed" in ok.stdout and "PASS    ragged_P_text-float32" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lvsa.testing", "nosuchbackend"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown backend 'nosuchbackend'" in bad.stderr
