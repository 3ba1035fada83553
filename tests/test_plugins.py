"""Plugin loading through real entry points: discovery, allowlist, broken plugins, clashes."""
import pytest
import torch

import lvsa
from lvsa import plugins
from lvsa.plugins import BackendNameClash

BACKEND_SRC = '''
from lvsa.backend import Backend
from lvsa.hookspecs import hookimpl
from lvsa.backends.reference import ReferenceBackend

class {cls}(ReferenceBackend):
    name = "{name}"
    description = "test backend"

@hookimpl
def lvsa_register_backends(register):
    register({cls}())
'''


def test_reference_registers_through_the_hook(fresh_plugins):
    pm = plugins.plugin_manager()
    names = [pm.get_name(i.plugin) for i in pm.hook.lvsa_register_backends.get_hookimpls()]
    assert "lvsa.reference" in names
    ref = plugins.backends()["reference"]
    assert ref.distribution == "lvsa"


def test_entry_point_backend_is_loaded_with_its_distribution(fresh_plugins, make_dist):
    make_dist("lvsa-fakebk", {"fakebk": "fakebk_mod"},
              {"fakebk_mod": BACKEND_SRC.format(cls="Fake", name="fake")})
    bk = plugins.backends()
    assert "fake" in bk and bk["fake"].distribution == "lvsa-fakebk"
    rec = [r for r in plugins.plugin_records() if r.name == "fakebk"]
    assert rec and rec[0].status == "loaded" and rec[0].distribution == "lvsa-fakebk"
    # and it runs when named
    m = lvsa.plan_schedule(3, 1, 1, 1).mask(0)
    q = torch.randn(1, 6, 2, 4)
    out = lvsa.attention(q, q, q, m, backend="fake")
    assert torch.allclose(out, lvsa.attention(q, q, q, m, backend="reference"))


def test_allowlist(fresh_plugins, make_dist, monkeypatch):
    make_dist("lvsa-fa", {"fa": "fa_mod"}, {"fa_mod": BACKEND_SRC.format(cls="A", name="fa")})
    make_dist("lvsa-fb", {"fb": "fb_mod"}, {"fb_mod": BACKEND_SRC.format(cls="B", name="fb")})
    monkeypatch.setenv("LVSA_LOAD_PLUGINS", "fb")
    bk = plugins.backends()
    assert "fb" in bk and "fa" not in bk
    status = {r.name: r.status for r in plugins.plugin_records()}
    assert status["fa"].startswith("skipped") and status["fb"] == "loaded"
    plugins.reset()
    monkeypatch.setenv("LVSA_LOAD_PLUGINS", "")
    bk = plugins.backends()
    assert "fa" not in bk and "fb" not in bk and "reference" in bk
    with pytest.raises(lvsa.UnknownBackend, match="LVSA_LOAD_PLUGINS"):
        plugins.get_backend("fa")


def test_broken_plugin_is_reported_and_skipped(fresh_plugins, make_dist, capsys):
    make_dist("lvsa-broken", {"broken": "broken_mod"},
              {"broken_mod": "raise ImportError('libfoo.so: cannot open shared object file')\n"})
    make_dist("lvsa-good", {"good": "good_mod"}, {"good_mod": BACKEND_SRC.format(cls="G", name="good")})
    bk = plugins.backends()
    assert "good" in bk and "reference" in bk
    rec = {r.name: r for r in plugins.plugin_records()}
    assert rec["broken"].status == "failed" and "libfoo.so" in rec["broken"].error
    err = capsys.readouterr().err
    assert "[LVSA-PLUGIN] plugin 'broken' from lvsa-broken failed to load and was skipped" in err


def test_two_backends_with_one_name_is_a_clear_error(fresh_plugins, make_dist):
    make_dist("lvsa-one", {"one": "one_mod"}, {"one_mod": BACKEND_SRC.format(cls="X", name="dup")})
    make_dist("lvsa-two", {"two": "two_mod"}, {"two_mod": BACKEND_SRC.format(cls="Y", name="dup")})
    with pytest.raises(BackendNameClash) as e:
        plugins.backends()
    assert "lvsa-one" in str(e.value) and "lvsa-two" in str(e.value) and "'dup'" in str(e.value)


def test_event_sink_plugin_receives_events(fresh_plugins, make_dist):
    make_dist("lvsa-sink", {"sink": "sink_mod"}, {"sink_mod": '''
        from lvsa.hookspecs import hookimpl
        EVENTS = []

        @hookimpl
        def lvsa_event(event):
            EVENTS.append(event.kind)
    '''})
    import importlib
    from lvsa import telemetry
    telemetry.emit("fallback", origin="t", reason="r", seq_len=1)
    assert "fallback" in importlib.import_module("sink_mod").EVENTS


def test_import_lvsa_needs_only_torch(tmp_path):
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('pluggy','diffusers','triton','flashinfer','torch_npu','transformers'):\n"
            "    sys.modules[m] = None\n"
            "import lvsa\n"
            "s = lvsa.plan_schedule(81, 3, 1, 21)\n"
            "print(s.key_frame_interval)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "6"


def test_clash_keeps_failing_loudly_and_never_empties_the_registry(fresh_plugins, make_dist):
    make_dist("lvsa-one", {"one": "one_mod"}, {"one_mod": BACKEND_SRC.format(cls="X", name="dup")})
    make_dist("lvsa-two", {"two": "two_mod"}, {"two_mod": BACKEND_SRC.format(cls="Y", name="dup")})
    for _ in range(2):
        with pytest.raises(BackendNameClash):
            plugins.backends()


def test_register_hook_that_raises_is_skipped(fresh_plugins, make_dist, capsys):
    make_dist("lvsa-bad", {"badhook": "badhook_mod"}, {"badhook_mod": '''
        from lvsa.hookspecs import hookimpl

        @hookimpl
        def lvsa_register_backends(register):
            raise RuntimeError("CUDA driver too old")
    '''})
    bk = plugins.backends()
    assert "reference" in bk
    rec = {r.name: r for r in plugins.plugin_records()}
    assert rec["badhook"].status == "failed" and "CUDA driver too old" in rec["badhook"].error
    assert "[LVSA-PLUGIN] plugin 'badhook' from lvsa-bad failed to load" in capsys.readouterr().err


def test_selection_follows_registration(fresh_plugins, monkeypatch):
    from lvsa import dispatch
    from lvsa.backend import Problem
    from lvsa.backends.reference import ReferenceBackend
    from lvsa.hookspecs import hookimpl

    class Late(ReferenceBackend):
        name = "late"
        priority = {"cpu": 5}

    class P:
        @hookimpl
        def lvsa_register_backends(self, register):
            register(Late())

    prob = Problem("cpu", torch.float32, 1, 4, 1, 1, 8, T=2, P=2)
    assert dispatch.select_backend(prob).name == "reference"
    p = P()
    plugins.register_plugin(p)
    assert dispatch.select_backend(prob).name == "late"
    plugins.unregister_plugin(p)
    assert dispatch.select_backend(prob).name == "reference"


def test_backend_settings_are_declared_by_their_owners_and_validated(fresh_plugins, monkeypatch):
    """LVSA_TRITON_CONFIG, LVSA_FLASHINFER_WORKSPACE_MB and LVSA_JSONL_PATH belong to the
    distributions that read them: listed by `lvsa info --vars` through the registry, parsed
    like lvsa's own variables (a bad value names the variable), never called misspelled."""
    from lvsa.config import env_table, unknown_variables

    settings = {s.env: s for s in plugins.declared_settings()}
    assert {"LVSA_TRITON_CONFIG", "LVSA_FLASHINFER_WORKSPACE_MB", "LVSA_JSONL_PATH"} <= set(settings)
    table = env_table(settings.values())
    assert "| LVSA_FLASHINFER_WORKSPACE_MB | (lvsa-cuda: flashinfer) | 128 |" in table
    with pytest.raises(ValueError, match="LVSA_FLASHINFER_WORKSPACE_MB='lots' is invalid: expected an integer"):
        settings["LVSA_FLASHINFER_WORKSPACE_MB"].read({"LVSA_FLASHINFER_WORKSPACE_MB": "lots"})
    with pytest.raises(ValueError, match="LVSA_TRITON_CONFIG='1,2'"):
        settings["LVSA_TRITON_CONFIG"].read({"LVSA_TRITON_CONFIG": "1,2"})
    env = {"LVSA_TRITON_CONFIG": "64,64,4,2,span", "LVSA_JSONL_PATH": "/tmp/x.jsonl"}
    assert unknown_variables(env, settings.values()) == {}
    assert set(unknown_variables(env)) == set(env)  # without the owners' declarations
