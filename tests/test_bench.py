"""``lvsa bench``: the quick runs end to end on the CPU, the attention/rest split, the
baselines' honesty, OOM as a result, the device record, --compare and the README report."""
import glob
import json
import os
import shlex
import stat
import sys
import types

import pytest
import torch

from lvsa.cli import main

from test_npu_smi import SAMPLE_910B


def _results(tmp_path, kind):
    (path,) = glob.glob(str(tmp_path / f"{kind}-*.json"))
    with open(path) as fh:
        return path, json.load(fh)


# ---------------------------------------------------------------- bench model
@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    """``lvsa bench model --quick`` once for the module (all three tiny models)."""
    out = tmp_path_factory.mktemp("bench-model")
    rc = main(["bench", "model", "--quick", "--out", str(out), "--no-progress", "--tag", "t"])
    assert rc == 0
    path, data = _results(out, "model")
    return out, path, data


def test_quick_model_run_writes_every_output(quick_model):
    out, path, data = quick_model
    meta, records = data["meta"], data["records"]
    assert meta["command"].startswith("lvsa bench model") and "--quick" in meta["command"]
    assert meta["device_before"]["cpu"]["name"] and "device_after" in meta
    assert meta["versions"]["diffusers"] == "0.42.1"
    # the code behind the numbers: this checkout's commit, and fa4's mask_mod kind
    assert len(meta["code"]["git_commit"]) == 40 and meta["code"]["git_dirty"] in (True, False)
    assert meta["code"]["backend_variants"]["fa4"] == "mask_mod=div"
    assert [(r["model"], r["T"], r["batch"]) for r in records] == [
        ("tiny-wan", 21, 1), ("tiny-wan", 21, 2), ("tiny-wan", 41, 1), ("tiny-wan", 41, 2),
        ("tiny-hunyuan", 49, 1), ("tiny-cogvideox", 25, 1)]
    md = open(path[:-5] + ".md").read()
    assert "| tiny Wan (quick) | 41 (161) | 2 |" in md and "reference" in md
    pngs = sorted(os.path.basename(p) for p in glob.glob(str(out / "*.png")))
    assert [p.rsplit("-", 1)[-1] for p in pngs] == ["speedup.png", "time.png"]


def test_quick_model_rows_are_measured_and_split(quick_model):
    _, _, data = quick_model
    for rec in data["records"]:
        V = rec["variants"]
        assert set(V) == {"diffusers", "dense", "reference"}, rec["refused"]
        for name, r in V.items():
            assert "error" not in r, (rec["model"], name, r)
            assert len(r["samples_s"]) == 2 and r["time_s"] > 0
            assert 0 < r["attention_time_s"] <= r["time_s"]
            # self-attention only (cross-attention and the text refiner are "the rest"): one call
            # per layer, two through lvsa's joint-text processors (video queries, text queries)
            per_layer = 2 if name != "diffusers" and rec["family"] != "wan" else 1
            assert r["attention_calls"] == per_layer * rec["layers"], (rec["model"], name)
        assert V["dense"]["lvsa"]["sparse_calls"] == 0 and V["dense"]["lvsa"]["dense_calls"] == rec["layers"]
        lv = V["reference"]["lvsa"]
        assert lv["fallbacks"] == 0 and lv["backend"] in ("reference", "dense")
        sparse = not rec["dense_by_design"]
        assert (lv["sparse_calls"] == rec["layers"]) == sparse
        assert (rec["density"] < 1.0) == sparse
        # the ceiling is rest + dense attention x density, from the dense baseline
        d = V["dense"]
        assert rec["ceiling_s"] == pytest.approx(d["time_s"] - d["attention_time_s"] * (1 - rec["density"]))
        assert V["reference"]["of_ceiling"] == pytest.approx(rec["ceiling_s"] / V["reference"]["time_s"])
        assert "flex" in rec["refused"] and "device is cpu" in rec["refused"]["flex"][0]


def test_text_models_count_their_joint_text_tokens(quick_model):
    _, _, data = quick_model
    hy = next(r for r in data["records"] if r["model"] == "tiny-hunyuan")
    cog = next(r for r in data["records"] if r["model"] == "tiny-cogvideox")
    assert hy["text_tokens"] == 8 and cog["text_tokens"] == 8   # valid prompt tokens only
    assert hy["tokens"] == hy["video_tokens"] + 8


def test_dense_baseline_equals_diffusers_attention():
    """The best-dense baseline is lvsa's processor at full density: the same function as
    diffusers' own attention (only faster kernels), for each family."""
    from lvsa.bench import model as bm
    from lvsa.bench.specs import get_spec

    for name in ("tiny-wan", "tiny-hunyuan", "tiny-cogvideox"):
        spec = get_spec(name)
        tr = bm.build_transformer(spec, "cpu", torch.float32)
        T = spec.frames[-1]
        inputs = bm.make_inputs(spec, tr, T, 1, "cpu", torch.float32)
        args = types.SimpleNamespace()
        ctx = bm.Context(spec, tr, "cpu", torch.float32, args)
        ref = ctx.forward(inputs)
        with bm.installed(ctx, "dense", T) as engine:
            out = ctx.forward(inputs)
            summary = engine.end_generation()
        assert summary["dense_calls"] == spec.layers and summary["sparse_calls"] == 0
        torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
        with bm.installed(ctx, "reference", T):
            sparse = ctx.forward(inputs)
        assert not torch.allclose(sparse, ref, atol=1e-4), name  # sparse really is sparse here


def test_oom_is_a_result_and_the_run_goes_on(monkeypatch, tmp_path):
    from lvsa.bench import model as bm

    real = bm.Context.forward

    def forward(self, inputs):
        state = self.tr.__dict__.get("_lvsa_state")
        if state is not None and state.engine.config.backend == "reference":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, inputs)

    monkeypatch.setattr(bm.Context, "forward", forward)
    rc = main(["bench", "model", "--quick", "--models", "tiny-wan:41@1", "tiny-cogvideox:25@1", "--out",
               str(tmp_path), "--no-progress"])
    assert rc == 0
    path, data = _results(tmp_path, "model")
    assert [r["variants"]["reference"].get("error") for r in data["records"]] == ["OOM", "OOM"]
    assert all(r["variants"]["dense"]["time_s"] > 0 for r in data["records"])
    assert "Out of memory: tiny Wan (quick) T41 B1 reference" in open(path[:-5] + ".md").read()


def test_budget_skips_rows_and_says_so(tmp_path, capsys):
    rc = main(["bench", "model", "--quick", "--models", "tiny-wan:41@1", "--budget-s", "1e-9",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    _, data = _results(tmp_path, "model")
    assert data["records"] == [] and data["meta"]["skipped"][0].startswith("tiny-wan T41 B1 (estimated")
    assert "Skipped (time budget): tiny-wan T41 B1" in capsys.readouterr().out


def test_baselines_dense_runs_without_diffusers_and_reports_not_run(tmp_path, capsys):
    """`--baselines dense`: the rows have no diffusers variant (not an error), the report
    says "not run" there and keeps the speed claims against the best dense; merged with a
    file that timed diffusers' own attention, that time fills the column."""
    rc = main(["bench", "model", "--quick", "--models", "tiny-wan:21@1", "--baselines", "dense",
               "--out", str(tmp_path), "--no-progress", "--tag", "dense-only"])
    assert rc == 0
    path, data = _results(tmp_path, "model")
    (rec,) = data["records"]
    assert data["meta"]["baselines"] == ["dense"] and "--baselines dense" in data["meta"]["command"]
    assert set(rec["variants"]) == {"dense", "reference"} and rec["dense_baseline"] == "dense"
    ref = rec["variants"]["reference"]
    assert ref["speedup_vs_dense"] > 0 and "speedup_vs_diffusers" not in ref
    md = open(path[:-5] + ".md").read()
    assert "| tiny Wan (quick) | 21 (81) | 1 |" in md and "| not run |" in md and "Errors:" not in md
    assert "Baselines not run (`--baselines dense`): diffusers." in md
    capsys.readouterr()
    assert main(["bench", "report", path, "--print"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tiny Wan (quick)"))
    assert row.split("|")[4].strip() == "not run" and row.split("|")[5].strip().endswith(" s")
    # an older file's diffusers time joins the row (the newer file did not run it)
    old = json.loads(json.dumps(data))
    old["meta"]["date"] = "2000-01-01T00:00:00+00:00"
    old["records"][0]["variants"] = {"diffusers": dict(rec["variants"]["dense"], time_s=123.0)}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["bench", "report", path, str(tmp_path / "old.json"), "--print"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tiny Wan (quick)"))
    assert row.split("|")[4].strip() == "123 s" and row.split("|")[-2].strip() == "1, 2"
    assert main(["bench", "model", "--quick", "--baselines", "none", "dense"]) == 2
    assert "'none' cannot be given with a baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "model", "--quick", "--baselines", "sdpa"])
    assert e.value.code == 2 and "invalid choice: 'sdpa'" in capsys.readouterr().err


def test_model_arguments_are_checked():
    from lvsa.bench.model import parse_model_arg

    assert parse_model_arg("wan2.1-1.3b:121,81@2,1") == ("wan2.1-1.3b", [121, 81], [2, 1])
    assert parse_model_arg("wan2.1-14b") == ("wan2.1-14b", None, None)
    assert main(["bench", "model", "--models", "wan:0"]) == 2
    assert main(["bench", "model", "--models", "nosuchmodel"]) == 2
    assert main(["bench", "model", "--repeats", "0"]) == 2


def test_full_size_specs_are_the_public_configs():
    """Spot checks of the embedded configs against the released models' figures."""
    from lvsa.bench.specs import SPECS

    wan, wan14, hy, cog = (SPECS[n] for n in ("wan2.1-1.3b", "wan2.1-14b", "hunyuanvideo-1.5", "cogvideox-5b"))
    assert (wan.heads * wan.head_dim, wan.layers, wan.config["ffn_dim"], wan.tokens_per_frame) == (1536, 30, 8960, 1560)
    assert (wan14.heads * wan14.head_dim, wan14.layers, wan14.config["ffn_dim"]) == (5120, 40, 13824)
    assert (hy.heads, hy.layers, hy.tokens_per_frame, hy.in_channels, sum(hy.config["rope_axes_dim"])) == \
        (16, 54, 1560, 65, 128)
    assert (cog.heads, cog.head_dim, cog.layers, cog.tokens_per_frame, cog.text["len"]) == (48, 64, 42, 1350, 226)


def test_full_size_specs_build_the_released_model_sizes():
    """Each embedded config builds the real diffusers class (on the meta device: no memory)
    with the released parameter count."""
    import diffusers

    from lvsa.bench.specs import SPECS

    expect = {"wan2.1-1.3b": 1.42e9, "wan2.1-14b": 14.29e9, "hunyuanvideo-1.5": 8.33e9, "cogvideox-5b": 5.57e9}
    for name, n in expect.items():
        spec = SPECS[name]
        with torch.device("meta"):
            tr = getattr(diffusers, spec.class_name).from_config(dict(spec.config))
        assert sum(p.numel() for p in tr.parameters()) == pytest.approx(n, rel=0.01), name


def test_model_dir_reads_a_local_checkpoint_config(tmp_path):
    from lvsa.bench.specs import SPECS, spec_from_dir

    (tmp_path / "transformer").mkdir()
    cfg = dict(SPECS["tiny-wan"].config, _class_name="WanTransformer3DModel", num_layers=3)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(cfg))
    spec, tdir = spec_from_dir(str(tmp_path), 64, 64)
    assert spec.layers == 3 and spec.family == "wan" and tdir.endswith("transformer")
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="not one lvsa benchmarks"):
        spec_from_dir(str(tmp_path))


def test_model_dir_runs_a_local_checkpoint_with_its_weights(tmp_path):
    from lvsa.bench import model as bm
    from lvsa.bench.specs import get_spec

    tr = bm.build_transformer(get_spec("tiny-wan"), "cpu", torch.float32)
    tr.save_pretrained(str(tmp_path / "ckpt" / "transformer"))
    out = tmp_path / "out"
    rc = main(["bench", "model", "--model-dir", str(tmp_path / "ckpt"), "--height", "64", "--width", "64",
               "--frames", "41", "--batches", "1", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    _, data = _results(out, "model")
    (rec,) = data["records"]
    assert rec["weights"].endswith("transformer") and rec["config_source"].endswith("config.json")
    assert rec["variants"]["reference"]["lvsa"]["sparse_calls"] == rec["layers"] == 2


# ------------------------------------------------------------ bench attention
def test_quick_attention_run(tmp_path):
    rc = main(["bench", "attention", "--quick", "--shapes", "quick-hy-t49-text", "--out", str(tmp_path),
               "--no-progress", "--iters", "1"])
    assert rc == 0
    path, data = _results(tmp_path, "attention")
    (rec,) = data["records"]
    R = rec["results"]
    assert R["dense_sdpa"]["ms"] > 0 and R["reference"]["ms"] > 0
    assert "refused" in R["triton"]["error"] and rec["ideal_ms"] == pytest.approx(R["dense_sdpa"]["ms"] * rec["density"])
    assert data["meta"]["repeats"] == 1 and "quick-hy-t49-text" in open(path[:-5] + ".md").read()
    md = open(path[:-5] + ".md").read()
    # one column per backend that ran or refused; the refused ones read n/a, the best is named
    assert "| SDPA ms | reference ms |" in md and "reference/ideal" in md and "| best |" in md
    assert rec["best_backend"] == "reference" and rec["ratios"]["reference_vs_ideal"] == pytest.approx(
        rec["ideal_ms"] / R["reference"]["ms"])


def _att_rec(shape, results, density=0.5, **extra):
    rec = {"shape": shape, "model": "m", "heads": 2, "T": 9, "P": 4, "D": 8, "text": 0, "batch": 1,
           "density": density, "results": results, **extra}
    dense = [r["ms"] for k, r in results.items() if k.startswith("dense_") and r.get("ms")]
    rec["ideal_ms"] = min(dense) * density if dense else None
    return rec


def test_attention_table_has_a_ratio_column_per_backend_and_the_best():
    from lvsa.bench import attention as A

    recs = [_att_rec("s1", {"dense_cudnn": {"ms": 10.0}, "dense_fa2": {"ms": 16.0}, "fa4": {"ms": 4.5},
                            "flashinfer": {"ms": 5.0, "rel_err": 3e-3, "extra_mem_frac": 0.004},
                            "triton": {"error": "refused: needs a GPU"}, "triton[64,64,4,3]": {"ms": 9.0}}),
            _att_rec("s2", {"dense_cudnn": {"ms": 20.0}, "flashinfer": {"ms": 9.0}, "reference": {"ms": 12.0},
                            "fa4": {"error": "OOM"}})]
    for r in recs:
        A.summarize(r)
    assert recs[0]["ratios"]["fa4_vs_ideal"] == pytest.approx(5.0 / 4.5) and recs[0]["best_backend"] == "fa4"
    assert recs[1]["best_backend"] == "flashinfer"  # fa4 ran out of memory there
    head, rule, r1, r2 = A.table(recs)
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == ["shape", "B", "text", "density", "cuDNN ms", "FA2 ms", "fa4 ms", "flashinfer ms", "triton ms",
                    "reference ms", "ideal ms", "fa4/ideal", "flashinfer/ideal", "triton/ideal", "reference/ideal",
                    "best", "err fa4 / flashinfer / triton", "mem+ fa4 / flashinfer / triton"]
    assert rule.count("---") == len(cols)
    cells = dict(zip(cols, (c.strip() for c in r1.strip("|").split("|"))))
    assert (cells["fa4/ideal"], cells["flashinfer/ideal"], cells["triton ms"], cells["best"]) == (
        "1.11", "1.00", "n/a", "fa4")
    assert cells["reference ms"] == "—" and cells["err fa4 / flashinfer / triton"] == "— / 3.0e-03 / —"
    cells = dict(zip(cols, (c.strip() for c in r2.strip("|").split("|"))))
    assert (cells["fa4 ms"], cells["FA2 ms"], cells["flashinfer/ideal"], cells["best"]) == ("OOM", "—", "1.11",
                                                                                           "flashinfer")


def test_every_committed_attention_results_file_renders():
    """The results of every version of the benchmark (benchmarks/bench_attention.py's meta, then
    lvsa bench attention's) render with the generic columns."""
    from lvsa.bench import attention as A

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "benchmarks", "results", "attention-*.json")))
    assert len(paths) >= 8
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        for rec in data["records"]:
            A.summarize(rec)
        md = A.markdown(data["meta"], data["records"])
        assert md.startswith("# lvsa attention benchmark — NVIDIA H200 (driver "), path
        names = {n for r in data["records"] for n in r["results"] if A.is_backend(n)}
        for n in names:
            assert f"| {n} ms |" in md and f"{n}/ideal" in md, (path, n)
        for rec in data["records"]:
            if rec["best_backend"]:
                assert f"| {rec['best_backend']} |" in md


# ----------------------------------------------------------- compare / report
def test_compare_prints_the_ratio_per_row(quick_model, tmp_path, capsys):
    _, path, data = quick_model
    old = json.loads(json.dumps(data))
    for rec in old["records"]:
        for r in rec["variants"].values():
            r["time_s"] = r["time_s"] * 2
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    from lvsa.bench import common, model as bm

    lines = common.compare_lines(data, old, bm.compare_entries)
    row = next(ln for ln in lines if ln.startswith("tiny-wan T21 B1 w1 dense"))
    assert row.split()[-1] == "0.500"
    assert main(["bench", "model", "--quick", "--models", "tiny-cogvideox:25@1", "--out", str(tmp_path),
                 "--no-progress", "--compare", str(old_path)]) == 0
    assert "tiny-cogvideox T25 B1 w1 reference" in capsys.readouterr().out
    assert main(["bench", "model", "--quick", "--compare", str(tmp_path / "missing.json")]) == 2


def test_compare_lines_takes_no_label():
    """``compare_lines`` had a ``label`` argument it never used; passing one now fails
    loudly instead of being silently ignored."""
    from lvsa.bench import common

    def entries(d):
        return {(r["name"],): r["t"] for r in d["records"]}

    new = {"records": [{"name": "a", "t": 1.0}]}
    old = {"meta": {"command": "x", "date": "d"}, "records": [{"name": "a", "t": 4.0}]}
    assert common.compare_lines(new, old, entries)[-1].split()[-1] == "0.250"
    with pytest.raises(TypeError):
        common.compare_lines(new, old, entries, label="time")


def test_report_regenerates_the_readme_section(quick_model, tmp_path, capsys):
    _, path, _ = quick_model
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- lvsa-bench:start -->\nold numbers\n<!-- lvsa-bench:end -->\n\ntail\n")
    assert main(["bench", "report", path, "--readme", str(readme), "--check"]) == 1
    assert main(["bench", "report", path, "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("tail\n") and "--quick` results" in text
    assert "| tiny Wan (quick) | 41 (161) | 2 |" in text
    assert main(["bench", "report", path, "--readme", str(readme), "--check"]) == 0
    readme.write_text("no markers\n")
    assert main(["bench", "report", path, "--readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err


def test_committed_readme_section_is_generated():
    """README.md's performance table is exactly what `lvsa bench report` makes of the
    results file it names."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    commands = [part.split("`", 1)[0] for part in text.split("generated by `")[1:]]
    assert len(commands) == 3, "README has a single-GPU, a multi-GPU and an attention generated section"
    assert any("attention-" in c for c in commands)
    cwd = os.getcwd()
    try:
        os.chdir(root)
        for cmd in commands:   # `lvsa bench report FILE... [--single-gpu-results FILE...]`
            words = shlex.split(cmd)
            assert words[:3] == ["lvsa", "bench", "report"], cmd
            assert main(words[1:] + ["--check"]) == 0, cmd
    finally:
        os.chdir(cwd)


# -------------------------------------------------------------- device record
def _tool(tmp_path, name, script):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def test_gpu_record_falls_back_to_nvidia_smi(tmp_path, monkeypatch):
    from lvsa import devices
    from lvsa.bench import common

    monkeypatch.setitem(sys.modules, "pynvml", None)
    _tool(tmp_path, "nvidia-smi", 'case "$1" in *power.draw*) echo "0, NVIDIA H200, 580.159.04, 1024, 143771, '
                                  '118.40, 700.00, 1980, 1980, 3201, 33, 0, 0x0000000000000004";; '
                                  '*) echo "0, NVIDIA H200, 580.159.04, 1024, 143771";; esac\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    inv = devices.nvidia_inventory(detail=True)
    (g,) = inv["gpus"]
    assert inv["source"] == "nvidia-smi" and "NVML unavailable" in inv["nvml_reason"]
    assert (g["power_w"], g["sm_clock_mhz"], g["throttle_reasons"]) == (118.4, 1980, ["sw_power_cap"])
    st = common.device_state("cuda")
    assert st["gpus"][0]["name"] == "NVIDIA H200" and any("used nvidia-smi" in n for n in st["notes"])
    assert devices.nvidia_inventory()["gpus"] == [{"index": 0, "name": "NVIDIA H200", "memory_used_mib": 1024,
                                                   "memory_total_mib": 143771}]


def test_gpu_record_notes_missing_tools(tmp_path, monkeypatch):
    from lvsa.bench import common

    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    st = common.device_state("cuda")
    assert "gpus" not in st and any("nvidia-smi not found" in n for n in st["notes"])


def test_npu_record_reads_npu_smi_and_torch_npu(tmp_path, monkeypatch):
    from ascend_emulation import installed
    from lvsa.bench import common

    _tool(tmp_path, "npu-smi", f"cat <<'EOF'\n{SAMPLE_910B}EOF\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with installed(device_count=1):
        st = common.device_state("npu:0")
    assert st["source"] == "npu-smi" and "910B1" in st["npus"][0] and st["torch_npu"]
    assert "910B1" in common.describe_device(st)
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    st = common.device_state("npu:0")
    assert any("npu-smi not found" in n for n in st["notes"])


def test_region_timer_counts_outermost_calls_once():
    from lvsa.bench.common import RegionTimer, patched

    t = RegionTimer("cpu")
    inner = t.wrap(lambda x: x + 1)
    outer = t.wrap(lambda x: inner(x) * 2)
    assert outer(1) == 4 and inner(1) == 2
    assert t.calls == 2 and t.total_s() >= 0

    class Obj:
        def f(self):
            return 1
    o = Obj()
    with patched([(o, "f"), (o, "missing")], lambda fn: (lambda: fn() + 1)):
        assert o.f() == 2
    assert o.f() == 1 and "f" not in o.__dict__


# ------------------------------------------------------------------ multi-GPU
def test_world_size_two_on_gloo(tmp_path):
    """`--world-size 2` re-launches under torchrun; on the CPU the ranks talk over gloo:
    lvsa with context parallelism, diffusers' Ulysses as Wan's dense baseline, the 1-GPU
    times from two --single-gpu-results files (merged) and, for the backend they lack,
    measured on rank 0; every rank's memory gathered."""
    import subprocess

    ones = []
    for n, (date, variant, t) in enumerate((("2026-01-02", "dense", 7.0), ("2026-01-01", "diffusers", 9.0))):
        one = {"meta": {"date": date, "world_size": 1, "command": "lvsa bench model"},
               "records": [{"model": "tiny-wan", "T": 41, "batch": 1, "world_size": 1, "height": 64, "width": 64,
                            "variants": {variant: {"time_s": t}, "reference": {"error": "OOM"}}}]}
        ones.append(str(tmp_path / f"one{n}.json"))
        with open(ones[-1], "w") as fh:
            json.dump(one, fh)
    r = subprocess.run([sys.executable, "-m", "lvsa", "bench", "model", "--quick", "--world-size", "2",
                        "--models", "tiny-wan:41@1", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
                        "--single-gpu-results"] + ones, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _, data = _results(tmp_path, "model")
    (rec,) = data["records"]
    assert data["meta"]["world_size"] == 2 and rec["world_size"] == 2
    V = rec["variants"]
    assert set(V) == {"diffusers", "dense", "reference"} and all(v.get("time_s") for v in V.values()), V
    assert V["reference"]["lvsa"]["sparse_calls"] == rec["layers"] and V["reference"]["lvsa"]["fallbacks"] == 0
    assert {n: t for n, t in rec["single_gpu"].items() if n != "reference"} == {"dense": 7.0, "diffusers": 9.0}
    assert rec["single_gpu_from"] == {"dense": os.path.relpath(ones[0]), "diffusers": os.path.relpath(ones[1]),
                                      "reference": "rank 0"}
    assert rec["single_gpu"]["reference"] > 0 and V["reference"]["parallel_efficiency"] > 0
    assert len(V["reference"]["per_rank_memory"]) == 2
