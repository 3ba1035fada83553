"""Selection precedence, strict refusals, auto walk with reasons, run-time fallback."""
import pytest
import torch

import lvsa
from lvsa import dispatch, plugins, telemetry
from lvsa.backend import Problem
from lvsa.backends.reference import ReferenceBackend
from lvsa.hookspecs import hookimpl


class CudaOnly(ReferenceBackend):
    name = "cudaonly"
    devices = ("cuda",)
    min_compute_capability = (9, 0)
    requires = ("a_package_that_does_not_exist_lvsa",)


class Exploding(ReferenceBackend):
    name = "exploding"
    calls = 0

    def run(self, handle, *a, **kw):
        Exploding.calls += 1
        raise RuntimeError("kernel launch failed: too many resources requested")


class Marker(ReferenceBackend):
    name = "marker"
    calls = 0

    def run(self, handle, *a, **kw):
        Marker.calls += 1
        return super().run(handle, *a, **kw)


class _Plugin:
    def __init__(self, *bks):
        self.bks = bks

    @hookimpl
    def lvsa_register_backends(self, register):
        for b in self.bks:
            register(b)


@pytest.fixture
def with_backends(fresh_plugins):
    plugins.register_plugin(_Plugin(CudaOnly(), Exploding(), Marker()), name="test-backends",
                            distribution="lvsa-tests")
    Marker.calls = 0
    yield


def ranks(monkeypatch, **by_name):
    """Set the auto-selection rank on the CPU of the test backends (others: never auto)."""
    for cls in (CudaOnly, Exploding, Marker):
        r = by_name.get(cls.name)
        monkeypatch.setattr(cls, "priority", {"cpu": r} if r is not None else {})


def inputs(T=6, P=5):
    mask = lvsa.plan_schedule(T, 1, 1, 2).mask(1)
    q = torch.randn(2, T * P, 4, 8)
    k = torch.randn(2, T * P, 2, 8)
    return mask, q, k, torch.randn_like(k)


def cpu_problem(**kw):
    base = dict(device_kind="cpu", dtype=torch.bfloat16, batch=1, seq_len=100, num_heads=4,
                num_kv_heads=4, head_dim=128, T=10, P=10)
    base.update(kw)
    return Problem(**base)


def test_supports_reasons_name_actual_and_allowed(with_backends):
    r = plugins.get_backend("cudaonly").not_supported_reasons(cpu_problem())
    joined = " | ".join(r)
    assert "device is cpu, cudaonly runs on cuda" in joined
    assert "a_package_that_does_not_exist_lvsa" in joined and "pip install" in joined
    r2 = CudaOnly().not_supported_reasons(cpu_problem(device_kind="cuda", compute_capability=(8, 0)))
    assert any("compute capability is 8.0, needs >= 9.0" in x for x in r2)


def test_explicit_backend_that_cannot_run_raises_with_reasons(with_backends):
    mask, q, k, v = inputs()
    with pytest.raises(lvsa.BackendUnavailable) as e:
        lvsa.attention(q, k, v, mask, backend="cudaonly")
    assert "selected by argument" in str(e.value) and "runs on cuda" in str(e.value)
    with pytest.raises(lvsa.UnknownBackend, match="unknown backend 'nope'.*registered:"):
        lvsa.attention(q, k, v, mask, backend="nope")


def test_precedence_argument_context_env(with_backends, monkeypatch):
    mask, q, k, v = inputs()
    monkeypatch.setenv("LVSA_BACKEND", "cudaonly")
    with pytest.raises(lvsa.BackendUnavailable, match="selected by LVSA_BACKEND"):
        lvsa.attention(q, k, v, mask)
    with lvsa.use_backend("marker"):
        lvsa.attention(q, k, v, mask)          # context beats the variable
        assert Marker.calls == 1
        lvsa.attention(q, k, v, mask, backend="reference")  # argument beats the context
        assert Marker.calls == 1
    monkeypatch.setenv("LVSA_BACKEND", "marker")
    lvsa.attention(q, k, v, mask)
    assert Marker.calls == 2


def test_auto_walks_priority_and_records_refusals(with_backends, monkeypatch, capsys):
    ranks(monkeypatch, cudaonly=30, marker=20)
    assert dispatch.auto_order("cpu") == ["cudaonly", "marker", "reference"]
    sel = dispatch.select_backend(cpu_problem())
    assert sel.name == "marker" and sel.auto and sel.source == "auto"
    assert any("runs on cuda" in r for r in sel.refused["cudaonly"])
    assert list(sel.refused) == ["cudaonly"]
    err = capsys.readouterr().err
    assert "[LVSA] backend=marker (auto on cpu) refused: cudaonly:" in err


def test_backends_without_a_declared_rank_go_before_reference(with_backends):
    class Plain(ReferenceBackend):
        name = "plain"
        priority = None  # nothing declared: the default rank on each of its devices

    class Never(ReferenceBackend):
        name = "never"
        priority = {}  # auto never picks it; it runs when named

    plugins.register_plugin(_Plugin(Plain(), Never()), name="plain")
    order = dispatch.auto_order("cpu")
    assert order[-1] == "reference" and order.index("plain") < order.index("reference")
    assert "never" not in order and "never" in dispatch.explain(cpu_problem(dtype=torch.float32))


def test_runtime_error_falls_back_to_reference_in_auto(with_backends, monkeypatch, capsys):
    ranks(monkeypatch, exploding=10)
    mask, q, k, v = inputs()
    out = lvsa.attention(q, k, v, mask)
    want = lvsa.attention(q, k, v, mask, backend="reference")
    assert torch.equal(out, want)
    err = capsys.readouterr().err
    assert "[LVSA-FALLBACK] origin=lvsa.attention reason=backend_error seq_len=30 backend=exploding" in err
    assert "too many resources" in err and "falling back to the REFERENCE backend" in err
    assert telemetry.SESSION.fallbacks_by_reason["backend_error"] >= 1


def test_strict_reraises(with_backends, monkeypatch):
    ranks(monkeypatch, exploding=10)
    monkeypatch.setenv("LVSA_STRICT", "1")
    mask, q, k, v = inputs()
    with pytest.raises(RuntimeError, match="too many resources"):
        lvsa.attention(q, k, v, mask)


def test_explicit_backend_error_is_not_swallowed(with_backends):
    mask, q, k, v = inputs()
    with pytest.raises(RuntimeError, match="too many resources"):
        lvsa.attention(q, k, v, mask, backend="exploding")


def test_plan_is_cached_per_mask_and_shape(with_backends):
    calls = []

    class Counting(ReferenceBackend):
        name = "counting"

        def plan(self, mask, problem):
            calls.append(mask.offset)
            return super().plan(mask, problem)

    plugins.register_plugin(_Plugin(Counting()), name="counting")
    sched = lvsa.plan_schedule(6, 1, 1, 2)
    _, q, k, v = inputs()
    for step in range(6):
        lvsa.attention(q, k, v, sched.mask_for_step(step), backend="counting")
    assert sorted(calls) == list(range(sched.key_frame_interval))



def test_a_plan_cached_under_inference_mode_serves_autograd(fresh_plugins):
    # generating under torch.inference_mode() caches the reference plan's gather indices; a
    # later forward under autograd with the same mask (fine-tuning) must be able to use them
    mask, q, k, v = inputs()
    assert mask.density() < 1  # a sparse mask: the plan gathers K/V frames by index
    with torch.inference_mode():
        want = lvsa.attention(q, k, v, mask, backend="reference")
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    got = lvsa.attention(q, k, v, mask, backend="reference")
    got.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    assert bool(k.grad.abs().sum() > 0)
    assert torch.equal(got.detach(), want)
    (handle,) = [h for (b, m, _), h in dispatch._plans.items() if m == mask and b.name == "reference"]
    assert not any(t.is_inference() for *_, t in handle)  # (first, last, row, indices) groups

def test_a_backend_that_raised_is_demoted_for_that_problem(with_backends, monkeypatch, capsys):
    ranks(monkeypatch, exploding=20, marker=10)
    Exploding.calls = 0
    mask, q, k, v = inputs()
    for _ in range(3):
        lvsa.attention(q, k, v, mask)
    assert Exploding.calls == 1 and Marker.calls == 2  # first call: reference; then the next in line
    err = capsys.readouterr().err
    assert "[LVSA] backend=marker (auto on cpu) refused: exploding: raised at run time on this problem" in err


def test_check_requested_before_anything_loads(with_backends, monkeypatch):
    """A named backend is checked against the device up front (for lvsa generate: before a
    pipeline loads); auto needs no check."""
    assert dispatch.check_requested("cpu") is None
    assert dispatch.check_requested("cpu", requested="reference", dtype=torch.float32) == "reference"
    monkeypatch.setenv("LVSA_BACKEND", "nonexistent")
    with pytest.raises(lvsa.UnknownBackend, match="unknown backend 'nonexistent'"):
        dispatch.check_requested("cpu")
    monkeypatch.setenv("LVSA_BACKEND", "cudaonly")
    with pytest.raises(lvsa.BackendUnavailable, match=r"'cudaonly' \(selected by LVSA_BACKEND\) cannot "
                                                      r"run on cpu.*runs on cuda") as e:
        dispatch.check_requested("cpu", head_dim=128)
    assert any("a_package_that_does_not_exist_lvsa" in r for r in e.value.refused["cudaonly"])
