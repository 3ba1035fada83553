"""Third-party plugins that misbehave, installed as real distributions (a dist-info with
``entry_points.txt`` on sys.path, found through importlib.metadata): a backend returning
NaN or a wrong tensor, a telemetry sink that raises, a second ``reference``, a misspelled
``LVSA_LOAD_PLUGINS`` entry. None of them may break a run or fake a result."""
import json

import pytest
import torch

import lvsa
from lvsa import integrations, plugins, telemetry, tiny
from lvsa.errors import BackendNameClash, BackendOutputError

FAMILY = "wan"

BAD_BACKEND = '''
import torch
from lvsa.backends.reference import ReferenceBackend
from lvsa.hookspecs import hookimpl

CALLS = [0]

class Bad(ReferenceBackend):
    name = "{name}"
    priority = {{"cpu": 50}}

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        CALLS[0] += 1
        out = super().run(plan, q, k, v, text_k, text_v, scale)
        {body}
        return out

@hookimpl
def lvsa_register_backends(register):
    register(Bad())
'''
NAN = "out[0, 0, 0, 0] = float('nan')"
SHAPE = "out = out[:, :-1]"
DTYPE = "out = out.double()"
NAN_FROM_SECOND_CALL = "if CALLS[0] > 1: out[0, -1, 0, 0] = float('inf')"


@pytest.fixture
def install(make_dist, fresh_plugins):
    def inst(name, body):
        make_dist(f"lvsa-{name}", {name: f"{name}_mod"},
                  {f"{name}_mod": BAD_BACKEND.format(name=name, body=body)})
        plugins.reset()
    return inst


def _inputs(T=6, P=5, seed=0):
    mask = lvsa.plan_schedule(T, 1, 1, 2).mask(1)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T * P, 4, 8, generator=g)
    k = torch.randn(2, T * P, 2, 8, generator=g)
    return mask, q, k, torch.randn(k.shape, generator=g)


@pytest.mark.parametrize("name,body,what", [("nanbk", NAN, "non-finite values"),
                                            ("shapebk", SHAPE, "shape"),
                                            ("dtypebk", DTYPE, "dtype")])
def test_bad_output_is_a_backend_error_fallback_in_auto(install, capsys, monkeypatch, name, body, what):
    monkeypatch.setenv("LVSA_CHECK", "0")  # the first-use check holds without checked mode
    install(name, body)
    mask, q, k, v = _inputs()
    assert lvsa.dispatch.select_backend(lvsa.backend.Problem.from_tensors(q, k, mask)).name == name
    out = lvsa.attention(q, k, v, mask)
    assert torch.equal(out, lvsa.attention(q, k, v, mask, backend="reference"))
    err = capsys.readouterr().err
    assert f"reason=backend_error seq_len=30 backend={name}" in err and what in err
    assert f"from lvsa-{name}" in err
    assert telemetry.SESSION.fallbacks_by_reason["backend_error"] == 1
    lvsa.attention(q, k, v, mask)  # demoted for this problem: no second fallback
    assert telemetry.SESSION.fallbacks_by_reason["backend_error"] == 1


@pytest.mark.parametrize("how", ["argument", "LVSA_BACKEND", "LVSA_STRICT"])
def test_bad_output_names_the_backend_when_chosen_or_strict(install, monkeypatch, how):
    install("nanbk", NAN)
    mask, q, k, v = _inputs()
    kw = {}
    if how == "argument":
        kw["backend"] = "nanbk"
    elif how == "LVSA_BACKEND":
        monkeypatch.setenv("LVSA_BACKEND", "nanbk")
    else:
        monkeypatch.setenv("LVSA_STRICT", "1")
    with pytest.raises(BackendOutputError, match=r"backend 'nanbk' \(from lvsa-nanbk\) returned 1 "
                                                 r"non-finite values .*from finite inputs") as e:
        lvsa.attention(q, k, v, mask, **kw)
    assert e.value.backend == "nanbk"


def test_checked_mode_checks_every_call_and_blames_the_backend(install, monkeypatch, capsys):
    install("flaky", NAN_FROM_SECOND_CALL)
    mask, q, k, v = _inputs()
    monkeypatch.setenv("LVSA_CHECK", "0")
    lvsa.attention(q, k, v, mask)                      # first use: checked, fine
    bad = lvsa.attention(q, k, v, mask)                # unchecked: only the first use is
    assert not torch.isfinite(bad).all()
    monkeypatch.setenv("LVSA_CHECK", "1")
    out = lvsa.attention(q, k, v, mask)                # checked mode: every call
    assert torch.isfinite(out).all()
    err = capsys.readouterr().err
    assert "backend=flaky" in err and "the backend is at fault" in err and "upstream" not in err
    with pytest.raises(BackendOutputError, match="'flaky'"):
        lvsa.attention(q, k, v, mask, backend="flaky")


def test_a_nan_backend_cannot_fake_a_generation(install, pipe, monkeypatch):
    """The tiny Wan pipeline with a NaN-returning backend installed: the latent stays finite
    and equal to the reference run, and the summary reports the fallback."""
    monkeypatch.setenv("LVSA_CHECK", "0")
    kw = dict(num_frames=97, height=32, width=32, num_inference_steps=2)
    install("nanbk", NAN)
    integrations.enable(pipe)
    try:
        out = tiny.run_latent(pipe, FAMILY, **kw)
        s = integrations.last_summary(pipe)
        integrations.enable(pipe, backend="reference")
        want = tiny.run_latent(pipe, FAMILY, **kw)
    finally:
        integrations.disable(pipe)
    assert torch.isfinite(out).all() and torch.equal(out, want)
    assert s["fallbacks_by_reason"] == {"backend_error": 1} and s["sparse_calls"] > 1


# ------------------------------------------------------------------ sinks
def test_a_sink_that_raises_is_disabled_once_and_the_run_goes_on(make_dist, fresh_plugins, capsys):
    make_dist("lvsa-badsink", {"badsink": "badsink_mod"}, {"badsink_mod": '''
        from lvsa.hookspecs import hookimpl
        CALLS = []

        @hookimpl
        def lvsa_event(event):
            CALLS.append(event.kind)
            raise OSError("disk full")
    '''})
    make_dist("lvsa-goodsink", {"goodsink": "goodsink_mod"}, {"goodsink_mod": '''
        from lvsa.hookspecs import hookimpl
        EVENTS = []

        @hookimpl
        def lvsa_event(event):
            EVENTS.append(event.kind)
    '''})
    import importlib
    eng = lvsa.Engine(family="wan", window_size=4)
    eng.set_geometry(patches_per_frame=2)
    mask, q, k, v = _inputs()
    q = torch.randn(1, 30 * 2, 2, 8)
    for _ in range(3):
        eng.attention(q, q, q)            # emits schedule/engaged: no exception
        eng.attention(q[:, :7], q[:, :7], q[:, :7])  # a fallback event each time
    assert importlib.import_module("badsink_mod").CALLS == [importlib.import_module("badsink_mod").CALLS[0]]
    good = importlib.import_module("goodsink_mod").EVENTS
    assert good.count("fallback") == 3 and "plugin_error" in good
    err = capsys.readouterr().err
    line = "[LVSA-PLUGIN] plugin 'badsink' from lvsa-badsink raised in lvsa_event("
    assert err.count(line) == 1 and "and was disabled: OSError: disk full" in err
    rec = {r.name: r for r in plugins.plugin_records()}
    assert rec["badsink"].status == "disabled" and "disk full" in rec["badsink"].error


# ------------------------------------------------------ a second reference
DUP_REFERENCE = '''
from lvsa.backends.reference import ReferenceBackend
from lvsa.hookspecs import hookimpl

class Mine(ReferenceBackend):
    name = "reference"

@hookimpl
def lvsa_register_backends(register):
    register(Mine())
'''


def test_lvsa_info_shows_a_name_clash_instead_of_crashing(make_dist, fresh_plugins, capsys):
    from lvsa.cli import main

    make_dist("lvsa-dupref", {"dupref": "dupref_mod"}, {"dupref_mod": DUP_REFERENCE})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend name clash: two backends are named 'reference'" in out
    assert "distributions involved: lvsa, lvsa-dupref" in out
    assert "dupref from lvsa-dupref 1.0: loaded" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name_clash"]["distributions"] == ["lvsa", "lvsa-dupref"]
    assert main(["info", "--vars"]) == 0
    mask, q, k, v = _inputs()
    with pytest.raises(BackendNameClash, match="lvsa-dupref"):  # a run still refuses loudly
        lvsa.attention(q, k, v, mask)


# ------------------------------------------------------------- allowlist
def test_a_misspelled_load_plugins_entry_warns_once_with_the_nearest_name(make_dist, fresh_plugins,
                                                                          monkeypatch, capsys):
    make_dist("lvsa-mysink", {"mysink": "mysink_mod"}, {"mysink_mod": '''
        from lvsa.hookspecs import hookimpl

        @hookimpl
        def lvsa_event(event):
            pass
    '''})
    monkeypatch.setenv("LVSA_LOAD_PLUGINS", "mysnk")
    plugins.backends()
    telemetry.emit("warning", message="x")
    err = capsys.readouterr().err
    assert err.count("[LVSA] WARNING LVSA_LOAD_PLUGINS names 'mysnk'") == 1
    assert "did you mean 'mysink'?" in err
    assert {r.name: r.status for r in plugins.plugin_records()}["mysink"].startswith("skipped")


# ----------------------------------------------------- misspelled variables
def test_a_misspelled_variable_warns_once_with_the_nearest_name(make_dist, fresh_plugins,
                                                                monkeypatch, capsys):
    make_dist("lvsa-withvar", {"withvar": "withvar_mod"}, {"withvar_mod": '''
        from lvsa.config import Setting, p_str
        from lvsa.hookspecs import hookimpl

        @hookimpl
        def lvsa_settings():
            return [Setting("LVSA_WITHVAR_PATH", p_str, None, "where withvar writes", "withvar")]
    '''})
    lvsa.dispatch.clear_caches()
    monkeypatch.setenv("LVSA_WINDOWSIZE", "16")
    monkeypatch.setenv("LVSA_WITHVAR_PATH", "/tmp/x")      # declared by a plugin: known
    mask, q, k, v = _inputs()
    for _ in range(3):
        lvsa.attention(q, k, v, mask)
    err = capsys.readouterr().err
    want = "[LVSA] WARNING LVSA_WINDOWSIZE is set but nothing in lvsa reads it (ignored); did you mean LVSA_WINDOW_SIZE?"
    assert err.count(want) == 1 and "LVSA_WITHVAR_PATH" not in err
    from lvsa.cli import main
    assert main(["info", "--vars"]) == 0
    out = capsys.readouterr().out
    assert "| LVSA_WITHVAR_PATH | (withvar) |" in out
    assert "LVSA_WINDOWSIZE is set but nothing reads it (did you mean LVSA_WINDOW_SIZE?)" in out
