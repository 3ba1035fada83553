"""Autograd: a backend whose kernel has no backward is never run while autograd records the
call (its output would silently stop the gradients); auto passes it over for one that has a
backward (the reference, torch ops), a named one refuses with the cause and the fix, and
inference (no_grad / inference_mode) is unaffected."""
import pytest
import torch

import lvsa
from lvsa import dispatch, plugins
from lvsa.backend import Problem
from lvsa.backends.reference import ReferenceBackend
from lvsa.hookspecs import hookimpl
from lvsa.schedule import plan_schedule


class NoBackward(ReferenceBackend):
    """A fast kernel without a backward, as the CUDA kernels are: its output is detached."""
    name = "nobackward"
    grad_devices = ()
    priority = {"cpu": 500}
    calls = 0

    def run(self, handle, *a, **kw):
        NoBackward.calls += 1
        return super().run(handle, *a, **kw).detach()


class _Plugin:
    @hookimpl
    def lvsa_register_backends(self, register):
        register(NoBackward())


@pytest.fixture
def nobackward(fresh_plugins):
    plugins.register_plugin(_Plugin(), name="test-nobackward", distribution="lvsa-tests")
    NoBackward.calls = 0
    yield


def _case(requires_grad=True, L=3):
    T, P, H, D, B = 7, 5, 2, 8, 2
    mask = plan_schedule(T, 1, 1, 3).mask(1)
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(requires_grad)  # noqa: E731
    return mask, r(B, T * P, H, D), r(B, T * P, H, D), r(B, T * P, H, D), r(B, L, H, D), r(B, L, H, D)


def _dense_grads(mask, q, k, v, tk, tv, gout):
    P = q.shape[1] // mask.num_frames
    allowed = torch.cat([mask.to_dense("token", tokens_per_frame=P), torch.ones(q.shape[1], tk.shape[1], dtype=torch.bool)], 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, torch.cat([k, tk], 1)) * q.shape[-1] ** -0.5
    out = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), torch.cat([v, tv], 1))
    return torch.autograd.grad(out, (q, k, v, tk, tv), gout)


def test_auto_passes_over_a_kernel_without_backward_and_the_gradients_are_exact(nobackward):
    mask, q, k, v, tk, tv = _case()
    out = lvsa.attention(q, k, v, mask, tk, tv)
    assert NoBackward.calls == 0 and out.grad_fn is not None
    gout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, tk, tv), gout)
    for a, b in zip(got, _dense_grads(mask, q, k, v, tk, tv, gout)):
        assert torch.allclose(a, b, atol=1e-10)
    sel = dispatch.select_backend(Problem.from_tensors(q, k, mask, tk, v=v, text_v=tv))
    assert sel.name == "reference"
    assert "nobackward has no backward: its output would carry no gradients" in sel.refused["nobackward"][0]


def test_inference_runs_the_fast_kernel(nobackward):
    mask, q, k, v, tk, tv = _case()
    with torch.no_grad():
        lvsa.attention(q, k, v, mask, tk, tv)
    with torch.inference_mode():
        lvsa.attention(q, k, v, mask, tk, tv)
    assert NoBackward.calls == 2
    mask, q, k, v, tk, tv = _case(requires_grad=False)   # nothing requires grad: no autograd
    lvsa.attention(q, k, v, mask, tk, tv)
    assert NoBackward.calls == 3


def test_a_named_backend_without_backward_refuses_with_the_fix(nobackward):
    mask, q, k, v, tk, tv = _case()
    with pytest.raises(lvsa.BackendUnavailable, match=r"nobackward has no backward.*torch.no_grad\(\)"):
        lvsa.attention(q, k, v, mask, tk, tv, backend="nobackward")
    assert NoBackward.calls == 0


def test_grad_is_detected_from_any_input():
    mask, q, k, v, tk, tv = _case(requires_grad=False)
    assert not Problem.from_tensors(q, k, mask, tk, v=v, text_v=tv).grad
    assert Problem.from_tensors(q, k, mask, tk, v=v, text_v=tv.requires_grad_()).grad
    with torch.no_grad():
        assert not Problem.from_tensors(q, k, mask, tk, v=v, text_v=tv).grad


def test_every_shipped_kernel_backend_declares_where_it_has_a_backward(fresh_plugins):
    """The CUDA kernels (flashinfer, triton, fa4) and the Ascend one have none: refused under
    autograd on every device; the reference has one everywhere."""
    bks = plugins.backends()
    prob = Problem("cuda", torch.bfloat16, 1, 6 * 64, 2, 2, 64, T=6, P=64, compute_capability=(9, 0), grad=True)
    for name in ("flashinfer", "triton", "fa4", "ascend"):
        if name in bks:
            assert any("has no backward" in r for r in bks[name].not_supported_reasons(prob)), name
    assert not [r for r in bks["reference"].not_supported_reasons(prob) if "backward" in r]
    if "flex" in bks:   # flex_attention: a backward on CUDA, none on the CPU
        assert not [r for r in bks["flex"].not_supported_reasons(prob) if "backward" in r]
        cpu = Problem("cpu", torch.float32, 1, 6 * 64, 2, 2, 64, T=6, P=64, grad=True)
        assert any("has no backward on cpu" in r for r in bks["flex"].not_supported_reasons(cpu))


def test_the_doctor_says_no_grad_not_install_for_an_autograd_refusal():
    from lvsa.doctor.findings import refusal_fixes

    prob = Problem("cuda", torch.bfloat16, 1, 6 * 64, 2, 2, 64, T=6, P=64, compute_capability=(9, 0), grad=True)
    reasons = NoBackward().not_supported_reasons(prob)
    fix = refusal_fixes({"fa4": reasons + ["FlashAttention-4 is not installed (pip install lvsa-cuda[fa4])"]},
                        "cuda:0")
    assert any("torch.no_grad()" in line for line in fix)
    assert not any(line.startswith("pip install") for line in fix)       # installing would not help
    assert refusal_fixes({"fa4": ["FlashAttention-4 is not installed (pip install lvsa-cuda[fa4])"]},
                         "cuda:0") == ["pip install 'lvsa-cuda[fa4]'   # fa4"]
