"""Shared fixtures. Tests run in checked mode (LVSA_CHECK=1) and never touch the network."""
import importlib
import os
import sys
import textwrap

import pytest

os.environ.setdefault("LVSA_CHECK", "1")
if not __import__("torch").cuda.is_available():
    # Triton kernels run in its interpreter on machines without a GPU (set before any
    # kernel module is imported: triton.jit reads it at decoration time)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fresh_plugins():
    """Forget the plugin manager, selection cache and session counters around a test."""
    from lvsa import dispatch, plugins, telemetry

    plugins.reset()
    dispatch.clear_caches()
    telemetry.reset_session()
    yield
    plugins.reset()
    dispatch.clear_caches()
    telemetry.reset_session()


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """Install a throw-away distribution with real ``lvsa`` entry points on sys.path.

    ``make_dist("name", {"ep_name": "module"}, {"module": "source"})``
    """
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(name, entry_points, modules):
        info = tmp_path / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[lvsa]\n{eps}\n")
        for mod, src in modules.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
            sys.modules.pop(mod, None)
        importlib.invalidate_caches()
        return info

    yield make


@pytest.fixture(scope="module")
def pipe(request):
    """The tiny offline pipeline of the test module's ``FAMILY`` (built once per module)."""
    from lvsa import tiny

    return tiny.build(request.module.FAMILY)


@pytest.fixture
def clean(pipe, fresh_plugins):
    """``pipe`` with lvsa disabled again after the test."""
    from lvsa import integrations

    yield pipe
    integrations.disable(pipe)

# tests/vllm_omni needs the real vllm-omni 0.30 and runs in its own environment
# (ci/vllm_omni_env.sh, second pytest run of ci/test.sh, which sets LVSA_VLLM_OMNI_ENV=1)
collect_ignore = [] if os.environ.get("LVSA_VLLM_OMNI_ENV") == "1" else ["vllm_omni"]
