"""Auto selection by measured cost (shipped table, LVSA_AUTOTUNE probe, rank), the
cold-start rule, the compile lines and ``lvsa warmup``."""
import json
from pathlib import Path

import pytest
import torch

import lvsa
from lvsa import cli, costs, dispatch, plugins
from lvsa.backend import Problem
from lvsa.backends.reference import ReferenceBackend
from lvsa.config import Config
from lvsa.schedule import plan_schedule

from test_dispatch import _Plugin

ROOT = Path(__file__).resolve().parents[1]


CLOCK = [0.0]


@pytest.fixture
def fake_clock(monkeypatch):
    """The dispatcher's clock advances only when Slow runs: probe timings are exact."""
    import types

    CLOCK[0] = 0.0
    monkeypatch.setattr(dispatch, "time", types.SimpleNamespace(perf_counter=lambda: CLOCK[0]))


class Fast(ReferenceBackend):
    """Ranked below Slow; the cheaper one by every measurement in these tests."""
    name = "fast"
    priority = {"cpu": 20}
    calls = 0

    def run(self, plan, *a, **kw):
        Fast.calls += 1
        return super().run(plan, *a, **kw)


class Slow(ReferenceBackend):
    name = "slow"
    priority = {"cpu": 30}
    calls = 0
    delay = 0.0

    def run(self, plan, *a, **kw):
        Slow.calls += 1
        CLOCK[0] += Slow.delay  # the tests' clock (see fake_clock): no real sleeping
        return super().run(plan, *a, **kw)


class Jit(ReferenceBackend):
    """Compiles on first use into ``cache_dir`` (the test's tmp folder); ranked first."""
    name = "jit"
    priority = {"cpu": 40}
    compiles = True
    cache_dir = None
    builds = 0

    def compile_cache_dir(self):
        return Jit.cache_dir

    def plan(self, mask, problem):
        if not self.compile_cached(problem):
            Jit.builds += 1
        return super().plan(mask, problem)


@pytest.fixture
def fakes(fresh_plugins, tmp_path, monkeypatch):
    def install(*classes):
        plugins.register_plugin(_Plugin(*(c() for c in classes)), name="cost-fakes", distribution="lvsa-tests")
    Fast.calls = Slow.calls = Jit.builds = 0
    Slow.delay = 0.0
    Jit.cache_dir = str(tmp_path / "jit-cache")
    for var in ("LVSA_AUTOTUNE", "LVSA_COST_CACHE", "LVSA_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    return install


def inputs(T=8, P=16, H=2, D=16, text=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T * P, H, D, generator=g) for _ in range(3))
    tk = tv = torch.randn(1, text, H, D, generator=g) if text else None
    mask = plan_schedule(T, W=1, n=1, reference=2).mask(0)
    return q, k, v, mask, tk, tv


def write_table(folder: Path, device: str, rows: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "costs-test.json"
    path.write_text(json.dumps({"format": costs.TABLE_FORMAT, "device": device, "rows": rows}))
    costs.tables.cache_clear()
    return path


def class_of(q, mask, text=0):
    return costs.shape_class(q.shape[2], q.shape[3], text, mask.density())


# ------------------------------------------------------------- shape classes
def test_shape_class_buckets():
    assert costs.shape_class(12, 128, 0, 0.259).key == "density 0.20-0.35|heads 1-12|D128|video"
    assert costs.shape_class(40, 128, 0, 0.259).heads == "25+"
    assert costs.shape_class(16, 64, 256, 0.45).key == "density 0.35-0.50|heads 13-24|D64|text"
    assert costs.shape_class(12, 128, 0, 1.0).density == ">=0.95"
    assert costs.shape_class(12, 128, 0, 0.1).density == "<0.20"
    assert costs.shape_class(12, 128, 0, None).density == "?"


# ------------------------------------------------------------- the shipped table
def _make_cost_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_cost_table", ROOT / "benchmarks" / "make_cost_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_table_is_derived_from_the_committed_results():
    """lvsa/data/costs-nvidia-h200.json is exactly what the script makes from the results."""
    mod = _make_cost_table()
    shipped = json.loads((ROOT / "lvsa" / "data" / "costs-nvidia-h200.json").read_text())
    remade = mod.build([str(ROOT / s) for s in shipped["sources"]])
    remade["sources"] = shipped["sources"]
    assert remade == shipped


def test_a_shape_in_several_files_counts_once_per_backend_from_the_newest(tmp_path):
    """A backend re-measured at a shape (a faster kernel since) counts with its newest time
    only; a backend the newer file did not run keeps its older time; another shape of the
    class still counts (the median over shapes)."""
    mod = _make_cost_table()

    def rec(shape, fa4, triton=None, batch=1):
        res = {"dense_cudnn": {"ms": 100.0}, "fa4": {"ms": fa4}}
        if triton:
            res["triton"] = {"ms": triton}
        return {"shape": shape, "heads": 12, "D": 128, "text": 0, "density": 0.259, "batch": batch, "results": res}

    def write(name, records, date):
        path = tmp_path / name
        path.write_text(json.dumps({"meta": {"device": {"name": "NVIDIA H200"}, "date": date}, "records": records}))
        return str(path)

    old = write("old.json", [rec("a", 30.0, triton=33.0), rec("b", 28.0)], "2026-11-28T10:00:00+00:00")
    new = write("new.json", [rec("a", 26.0)], "2026-11-30T13:00:00+00:00")
    for order in ([old, new], [new, old]):                   # by the runs' dates, not the order given
        (row,) = mod.build(order)["rows"].values()
        assert row["costs"] == {"fa4": 0.27, "triton": 0.33}  # median(0.26, 0.28); triton from old
        assert row["shapes"] == ["a B1", "b B1"]


@pytest.mark.parametrize("heads,density,text,cands,best", [
    (40, 0.259, 0, ["triton", "reference"], "reference"),  # Wan 14B T81: reference beats triton
    (12, 0.259, 0, ["triton", "reference"], "triton"),  # Wan 1.3B T81: triton beats reference
    (12, 0.259, 0, ["flashinfer", "triton", "reference"], "flashinfer"),
    (12, 1.0, 0, ["flashinfer", "triton", "reference"], "reference"),  # a full mask: one dense SDPA
    (16, 0.45, 256, ["flashinfer", "triton", "reference"], "flashinfer"),
    (16, 0.654, 256, ["triton", "reference"], "reference"),  # HunyuanVideo T49 + text, near dense
])
def test_h200_table_orders_backends_as_measured(monkeypatch, heads, density, text, cands, best):
    monkeypatch.setattr(costs, "device_name", lambda device: "NVIDIA H200")
    costs.tables.cache_clear()
    problem = Problem("cuda", torch.bfloat16, 1, 81 * 1560, heads, heads, 128, text_len=text, T=81, P=1560,
                      compute_capability=(9, 0))
    cls = costs.shape_class(heads, 128, text, density)
    order, why = dispatch.rank_by_cost(problem, cls, cands, Config.load(env={}))
    assert order[0] == best and sorted(order) == sorted(cands)
    assert why.startswith("cost table costs-nvidia-h200.json (NVIDIA H200, ")


# ------------------------------------------------------------- table-driven auto
def test_auto_takes_the_cheaper_backend_of_the_table_row(fakes, tmp_path, monkeypatch, capsys):
    fakes(Fast, Slow)
    q, k, v, mask, _, _ = inputs()
    cls = class_of(q, mask)
    monkeypatch.setattr(costs, "DATA_DIR", tmp_path / "tables")
    write_table(tmp_path / "tables", "cpu", {cls.key: {"costs": {"slow": 0.9, "fast": 0.4, "reference": 1.0}}})
    out = lvsa.attention(q, k, v, mask)
    assert Fast.calls == 1 and Slow.calls == 0
    ref = lvsa.attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(out, ref)
    err = capsys.readouterr().err
    assert "[LVSA] backend=fast (auto on cpu)" in err
    assert "[LVSA] auto chose fast by cost table costs-test.json (cpu, " in err
    assert "fast 0.400" in err and "slow 0.900" in err


def test_no_row_for_the_class_means_declared_rank(fakes, tmp_path, monkeypatch):
    fakes(Fast, Slow)
    q, k, v, mask, _, _ = inputs()
    other = costs.shape_class(40, 128, 0, 0.5)
    monkeypatch.setattr(costs, "DATA_DIR", tmp_path / "tables")
    write_table(tmp_path / "tables", "cpu", {other.key: {"costs": {"slow": 0.9, "fast": 0.4}}})
    problem = Problem.from_tensors(q, k, mask)
    sel = dispatch.select_backend(problem, density=mask.density(), config=Config.load(env={}))
    assert sel.name == "slow"
    assert sel.why.startswith("declared rank (no cost table row for cpu, ") and "LVSA_AUTOTUNE=1" in sel.why


def test_a_row_that_never_measured_the_top_ranked_backend_is_not_trusted(fakes, tmp_path, monkeypatch):
    fakes(Fast, Slow)
    q, k, v, mask, _, _ = inputs()
    monkeypatch.setattr(costs, "DATA_DIR", tmp_path / "tables")
    write_table(tmp_path / "tables", "cpu", {class_of(q, mask).key: {"costs": {"fast": 0.4, "reference": 1.0}}})
    sel = dispatch.select_backend(Problem.from_tensors(q, k, mask), density=mask.density(),
                                  config=Config.load(env={}))
    assert sel.name == "slow" and "lacks slow" in sel.why


# ------------------------------------------------------------- LVSA_AUTOTUNE probe
def test_autotune_probes_once_caches_on_disk_and_reuses(fakes, fake_clock, tmp_path, monkeypatch, capsys):
    fakes(Fast, Slow)
    Slow.delay = 0.05  # 50 ms per call on the dispatcher's clock, the others 0
    cache = tmp_path / "probe.json"
    monkeypatch.setenv("LVSA_AUTOTUNE", "1")
    monkeypatch.setenv("LVSA_COST_CACHE", str(cache))
    q, k, v, mask, _, _ = inputs()
    out, name, _ = dispatch.run_attention(q, k, v, mask)
    torch.testing.assert_close(out, lvsa.attention(q, k, v, mask, backend="reference"))
    doc = json.loads(cache.read_text())
    entry = doc["probes"]["cpu"][class_of(q, mask).key]
    assert entry["ms"] == {"slow": pytest.approx(50.0), "fast": 0.0, "reference": 0.0}
    # slow is ranked first but measured slowest; fast ties the reference and outranks it
    assert name == "fast"
    assert f"[LVSA] auto chose fast by probe ({cache}, cpu, " in capsys.readouterr().err
    # a new process (caches cleared) reuses the file: no probe, slow never runs again
    dispatch.clear_caches()
    slow_calls = Slow.calls
    lvsa.attention(q, k, v, mask)
    assert Slow.calls == slow_calls
    # without LVSA_AUTOTUNE the declared rank decides
    monkeypatch.delenv("LVSA_AUTOTUNE")
    dispatch.clear_caches()
    lvsa.attention(q, k, v, mask)
    assert Slow.calls == slow_calls + 1


def test_a_probe_failure_is_recorded_and_that_backend_passed_over(fakes, tmp_path, monkeypatch):
    class Broken(Slow):
        name = "broken"
        priority = {"cpu": 50}

        def run(self, plan, *a, **kw):
            raise RuntimeError("no kernel image for this device")

    fakes(Fast, Broken)
    cache = tmp_path / "probe.json"
    monkeypatch.setenv("LVSA_AUTOTUNE", "1")
    monkeypatch.setenv("LVSA_COST_CACHE", str(cache))
    q, k, v, mask, _, _ = inputs()
    _, name, fell_back = dispatch.run_attention(q, k, v, mask)
    assert not fell_back and name in ("fast", "reference")
    entry = json.loads(cache.read_text())["probes"]["cpu"][class_of(q, mask).key]
    assert "no kernel image" in entry["errors"]["broken"] and "broken" not in entry["ms"]


def test_an_unreadable_probe_cache_is_reported_and_kept(fakes, tmp_path, monkeypatch, capsys):
    fakes(Fast, Slow)
    cache = tmp_path / "probe.json"
    cache.write_text("my notes, not json")
    monkeypatch.setenv("LVSA_AUTOTUNE", "1")
    monkeypatch.setenv("LVSA_COST_CACHE", str(cache))
    q, k, v, mask, _, _ = inputs()
    _, name, _ = dispatch.run_attention(q, k, v, mask)
    assert name == "slow"  # rank
    assert "probe cache unusable" in capsys.readouterr().err
    assert cache.read_text() == "my notes, not json"


def test_config_fields():
    cfg = Config.load(env={"LVSA_AUTOTUNE": "1", "LVSA_COST_CACHE": "/tmp/x.json"})
    assert cfg.autotune and cfg.cost_cache == "/tmp/x.json"
    with pytest.raises(ValueError, match="LVSA_AUTOTUNE"):
        Config.load(env={"LVSA_AUTOTUNE": "maybe"})


# ------------------------------------------------------------- cold start
def test_uncompiled_backend_is_passed_over_for_a_small_run_then_warmup_builds_it(fakes, capsys):
    fakes(Jit, Fast)
    q, k, v, mask, _, _ = inputs()
    _, name, _ = dispatch.run_attention(q, k, v, mask)
    assert name == "fast" and Jit.builds == 0
    err = capsys.readouterr().err
    assert "jit passed over: its compile for float32 head_dim=16 is not cached and this is a small run" in err
    assert "fast is ready (`lvsa warmup` builds jit ahead)" in err

    assert cli.main(["warmup", "--backends", "jit", "--model", "wan2.1-t2v-1.3b", "--head-dims", "16",
                     "--dtypes", "float32", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "warmup: jit float32 head_dim=16: built in " in out and "jit: " in out
    assert "[LVSA] compiling jit for float32 head_dim=16..." in err
    assert "[LVSA] jit for float32 head_dim=16 compiled in " in err
    assert Jit.builds == 1
    assert list(Path(Jit.cache_dir, "lvsa-compiled").iterdir())

    dispatch.clear_caches()  # a new process: the compile is cached on disk now
    _, name, _ = dispatch.run_attention(q, k, v, mask)
    assert name == "jit" and Jit.builds == 1
    assert "compiling" not in capsys.readouterr().err


def test_a_large_run_takes_the_best_backend_and_announces_its_compile(fakes, monkeypatch, capsys):
    fakes(Jit, Fast)
    monkeypatch.setattr(dispatch, "SMALL_FLOPS", 0.0)
    q, k, v, mask, tk, tv = inputs(text=4)
    _, name, _ = dispatch.run_attention(q, k, v, mask, tk, tv)
    dispatch.run_attention(q, k, v, mask, tk, tv)
    assert name == "jit" and Jit.builds == 1
    err = capsys.readouterr().err
    assert err.count("[LVSA] compiling jit for float32 head_dim=16 +text...") == 1
    assert err.count("[LVSA] jit for float32 head_dim=16 +text compiled in ") == 1


def test_backends_that_do_not_compile_are_always_ready():
    problem = Problem("cpu", torch.float32, 1, 16, 1, 1, 8)
    ref = ReferenceBackend()
    assert not ref.compiles and ref.compile_cached(problem) is True and dispatch.compile_ready(ref, problem)


def test_warmup_without_compiling_backends_says_so(fakes, capsys):
    fakes(Fast)
    assert cli.main(["warmup", "--device", "cpu", "--model", "wan2.1-t2v-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "reference: does not compile (ready)" in out and "fast: does not compile (ready)" in out


def test_warmup_json_reports_seconds_per_backend(fakes, capsys):
    fakes(Jit)
    assert cli.main(["warmup", "--device", "cpu", "--head-dims", "16", "--dtypes", "float32",
                     "--model", "hunyuanvideo-1.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    jit = next(r for r in doc["backends"] if r["backend"] == "jit")
    assert jit["built"] == ["float32 head_dim=16 +text"] and jit["seconds"] > 0
    assert doc["shapes"] == [{"head_dim": 16, "text": True, "tokens_per_frame": 1560}]


def test_warmup_shapes_carry_each_presets_tokens_per_frame():
    """fa4 compiles per tokens-per-frame P: warmup builds each preset's P at its default
    resolution (HunyuanVideo/Wan 480p 1560, CogVideoX 1350, Wan 2.2 TI2V 720p 880), or the
    P values given; a P below 1 is refused with the option's name."""
    from lvsa.commands.warmup import shapes_for

    assert shapes_for(["wan2.1-t2v-1.3b"]) == [(128, False, 1560)]
    assert shapes_for(["cogvideox-5b", "wan2.2-ti2v-5b"]) == [(64, True, 1350), (128, False, 880)]
    assert shapes_for(["hunyuanvideo-1.5"], tokens_per_frame=[3600, 1560]) == [(128, True, 1560), (128, True, 3600)]
    assert shapes_for(["wan"], head_dims=[64, 128]) == [(64, False, 1560), (128, False, 1560)]
    with pytest.raises(ValueError, match="--tokens-per-frame 0"):
        shapes_for(["wan"], tokens_per_frame=[0])


# ------------------------------------------------------------- lvsa info
def test_info_shows_the_choice_and_why(fakes, tmp_path, monkeypatch, capsys):
    fakes(Fast, Slow, Jit)
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["auto_selects"] == "jit"  # a typical problem is large: not held back by the compile
    assert d["selection_why"].startswith("declared rank (no cost table row for cpu, density 0.20-0.35")
    jit = next(b for b in d["backends"] if b["name"] == "jit")
    assert jit["compiles"] and jit["compile_cached"] is False
    # with a table row for the typical problem's class, info names the row
    cls = costs.shape_class(12, 128, 0, d["problem_density"])
    monkeypatch.setattr(costs, "DATA_DIR", tmp_path / "tables")
    write_table(tmp_path / "tables", "cpu", {cls.key: {"costs": {"jit": 0.5, "slow": 0.3, "fast": 0.4}}})
    dispatch.clear_caches()
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto selects: slow" in out and "  why: cost table costs-test.json (cpu, " in out


# ------------------------------------------------------------- benchmarks record cold starts
def test_bench_model_records_a_compiling_backends_cold_start(fakes, tmp_path):
    import glob

    fakes(Jit)
    assert cli.main(["bench", "model", "--quick", "--models", "tiny-wan:41@1", "--backends", "jit",
                     "--repeats", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    (path,) = glob.glob(str(tmp_path / "model-*.json"))
    (rec,) = json.loads(Path(path).read_text())["records"]
    cold = rec["variants"]["jit"]["cold_start_s"]
    assert len(cold) == 1 and next(iter(cold)).startswith("jit float32 head_dim=") and all(
        s > 0 for s in cold.values())
    assert "Cold starts (first use of a compiling backend" in Path(path[:-5] + ".md").read_text()


def test_cuda_backends_declare_their_compiles_and_caches(monkeypatch, tmp_path):
    from lvsa_cuda.flashinfer_backend import FlashInferBackend
    from lvsa_cuda.triton_backend import TritonBackend

    problem = Problem("cuda", torch.bfloat16, 1, 81 * 1560, 12, 12, 128, T=81, P=1560, compute_capability=(9, 0))
    tb, fb = TritonBackend(), FlashInferBackend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tb.compiles and tb.compile_cached(problem) is True  # the interpreter builds nothing
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path / "fi"))
    assert tb.compiles and fb.compiles
    assert tb.compile_key(problem) == "bfloat16 head_dim=128 sm_90"
    assert fb.compile_key(problem).startswith("bfloat16 head_dim=128 flashinfer ")
    assert tb.compile_cache_dir() == str(tmp_path / "triton")
    assert fb.compile_cache_dir() == str(tmp_path / "fi" / ".cache" / "flashinfer")
    for bk in (tb, fb):
        assert bk.compile_cached(problem) is False
        bk.mark_compiled(problem)
        assert bk.compile_cached(problem) is True
        assert bk.compile_cached(dataclasses_replace(problem, head_dim=64)) is False


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_a_compile_cache_probe_that_raises_is_said(capsys):
    """A broken compile_cached() makes the backend count as not compiled, with a line saying why."""
    class Broken(ReferenceBackend):
        name = "broken-probe"
        compiles = True

        def compile_cached(self, problem):
            raise OSError("cache dir unreadable")

    problem = Problem("cpu", torch.float32, 1, 16, 1, 1, 8)
    dispatch.clear_caches()
    assert dispatch.compile_ready(Broken(), problem) is False
    assert "broken-probe.compile_cached() raised OSError: cache dir unreadable; treated as not cached" in \
        capsys.readouterr().err
