"""``lvsa bench``'s dense baselines and its check of every output on the CPU:

* ``bench attention`` checks every backend's output against the reference, also when
  ``reference`` is not timed (computed once, untimed, for the check), and says why when
  even that cannot run;
* FlashAttention-4's dense forward as a dense kernel (``--dense fa4``) and in ``ideal``;
* ``bench model``'s *best dense* probe with FA4's dense forward as a candidate, and the
  dense row running through it (lvsa's one seam, :func:`lvsa.ops.dense_kernel`).

FA4 runs through the CPU stand-in of its documented API (tests/fa4_standin.py)."""
import glob
import json
import threading

import pytest
import torch

from lvsa.cli import main
from lvsa_cuda import fa4_backend as fa

from cuda_problems import h200_problem as _h200
from fa4_standin import fake_fa4  # noqa: F401 - fixture

SHAPE = "quick-hy-t49-text"  # 49 frames of 16 tokens, 8 text tokens, 2 heads, head_dim 32


def _results(tmp_path, kind):
    (path,) = glob.glob(str(tmp_path / f"{kind}-*.json"))
    with open(path) as fh:
        return path, json.load(fh)


def _row(md: str, start: str):
    """``{column: cell}`` of the table row of ``md`` starting with ``start``."""
    lines = md.splitlines()
    head = next(ln for ln in lines if ln.startswith("| shape |") or ln.startswith("| model |"))
    row = next(ln for ln in lines if ln.startswith(start))
    return dict(zip((c.strip() for c in head.strip("|").split("|")), (c.strip() for c in row.strip("|").split("|"))))


@pytest.fixture
def fa4_on_cpu(fake_fa4, monkeypatch):
    """The fa4 backend (sparse and dense) runnable on the CPU through the stand-in."""
    monkeypatch.setattr(fa.FA4Backend, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(fa.FA4Backend, "dtypes", (torch.bfloat16, torch.float16, torch.float32))
    monkeypatch.setattr(fa.FA4Backend, "head_dims", None)
    yield fake_fa4


def _attention(tmp_path, *extra):
    assert main(["bench", "attention", "--quick", "--shapes", SHAPE, "--out", str(tmp_path), "--no-progress",
                 "--iters", "1", *extra]) == 0
    path, data = _results(tmp_path, "attention")
    (rec,) = data["records"]
    return rec, open(path[:-5] + ".md").read(), path


# ------------------------------------------------------------ the reference check
def test_every_output_is_checked_when_the_reference_is_not_timed(fa4_on_cpu, tmp_path, monkeypatch):
    rec, md, _ = _attention(tmp_path / "a", "--backends", "fa4")
    R = rec["results"]
    assert "reference" not in R and rec["reference_check"] == {"mode": "check only", "error": None}
    assert R["fa4"]["ms"] > 0 and R["fa4"]["rel_err"] < 1e-5      # float32: exact up to rounding
    assert _row(md, f"| {SHAPE}")["err fa4"] == f"{R['fa4']['rel_err']:.1e}"
    assert "reference: check only (every shape): not timed" in md and "| reference ms |" not in md
    # the check compares outputs: a backend that returns the wrong thing is caught
    monkeypatch.setattr(fa.FA4Backend, "run", lambda self, plan, q, *a, **k: torch.zeros_like(q))
    rec, _, _ = _attention(tmp_path / "b", "--backends", "fa4")
    assert rec["results"]["fa4"]["rel_err"] == pytest.approx(1.0)


@pytest.mark.parametrize("timed", [False, True])
def test_a_reference_that_cannot_run_is_said_not_left_blank(fa4_on_cpu, tmp_path, monkeypatch, timed):
    from lvsa.backends.reference import ReferenceBackend

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(ReferenceBackend, "run", oom)
    rec, md, path = _attention(tmp_path, "--backends", *(["reference", "fa4"] if timed else ["fa4"]))
    R = rec["results"]
    mode = "timed" if timed else "check only"
    assert rec["reference_check"] == {"mode": mode, "error": "OOM"}
    assert R["fa4"]["ms"] > 0 and "rel_err" not in R["fa4"]
    assert R["fa4"]["unchecked"] == f"the reference{'' if timed else ' (check only)'} did not run: OOM"
    assert _row(md, f"| {SHAPE}")["err fa4"] == "n/c"
    assert f"{SHAPE}: fa4 not checked (n/c): the reference" in md
    # the README's table (lvsa bench report) says it too
    capsys_out = _report(path)
    assert "| n/c |" in capsys_out and "fa4 not checked (n/c)" in capsys_out


def _report(*paths):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", "report", *paths, "--print"]) == 0
    return buf.getvalue()


def test_report_keeps_an_older_check_and_old_files_render_as_before(tmp_path):
    """Merged with an older file that checked the backend, a newer run whose reference could
    not run shows the older error (its file named), not n/c; files from before the check of
    every output keep their — cells."""
    def att(name, date, results, **extra):
        rec = {"shape": "s", "model": "m", "heads": 2, "T": 9, "batch": 1, "text": 0, "density": 0.5,
               "results": results, **extra}
        data = {"meta": {"date": date, "command": f"lvsa bench attention --tag {name}", "dtype": "bfloat16",
                         "device_before": {"kind": "cpu", "cpu": {"name": "Test CPU"}}}, "records": [rec]}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        return str(tmp_path / f"{name}.json")

    old = att("old", "2026-11-01T00:00:00+00:00", {"dense_cudnn": {"ms": 4.0}, "reference": {"ms": 3.0},
                                                    "fa4": {"ms": 2.2, "rel_err": 3e-3}})
    new = att("new", "2026-11-02T00:00:00+00:00",
              {"dense_cudnn": {"ms": 4.0}, "fa4": {"ms": 2.0, "unchecked": "the reference (check only) did not run: OOM"}},
              reference_check={"mode": "check only", "error": "OOM"})
    out = _report(old, new)
    assert "| 3.0e-03 |" in out and "| n/c |" not in out and "not checked" not in out
    out = _report(new)
    assert "| n/c |" in out and "s: fa4 not checked (n/c): the reference (check only) did not run: OOM" in out
    legacy = att("legacy", "2026-11-03T00:00:00+00:00", {"dense_cudnn": {"ms": 4.0}, "fa4": {"ms": 2.0}})
    out = _report(legacy)
    assert "| — | — |" in out and "| n/c |" not in out and "\n- " not in out   # no notes


# ------------------------------------------------------------ FA4 dense in bench attention
def test_fa4_dense_is_a_dense_kernel_and_the_ideal_names_its_source(fa4_on_cpu, tmp_path):
    rec, md, path = _attention(tmp_path, "--backends", "reference", "--dense", "cudnn", "fa4")
    R = rec["results"]
    assert R["dense_sdpa"]["ms"] > 0 and R["dense_fa4"]["ms"] > 0 and R["dense_fa4"]["cold_s"] > 0
    # FA4's dense forward: every query over the video + text keys, no block sparsity
    dense = [c for c in fa4_on_cpu if c.get("dense")]
    assert dense and all(c["q"] == (1, 49 * 16, 2, 32) and c["k"] == (1, 49 * 16 + 8, 2, 32) for c in dense)
    assert len(dense) == len(fa4_on_cpu) == 1 + 1 + 1   # cold call, one warm-up, one timed (--quick, --iters 1)
    fastest = min(("dense_sdpa", "dense_fa4"), key=lambda k: R[k]["ms"])
    assert rec["ideal_from"] == fastest and rec["ideal_ms"] == pytest.approx(R[fastest]["ms"] * rec["density"])
    cells = _row(md, f"| {SHAPE}")
    assert cells["FA4 dense ms"] == f"{R['dense_fa4']['ms']:.1f}" and cells["SDPA ms"] == f"{R['dense_sdpa']['ms']:.1f}"
    label = {"dense_sdpa": "SDPA", "dense_fa4": "FA4 dense"}[fastest]
    note = f"ideal = the fastest of the dense kernels run (FA4 dense, SDPA) x density; it came from {label} (every shape)."
    assert note in md and note in _report(path)


def test_fa4_dense_that_cannot_run_says_the_fa4_backends_reasons(tmp_path):
    rec, md, _ = _attention(tmp_path, "--backends", "reference", "--dense", "fa4")
    err = rec["results"]["dense_fa4"]["error"]
    be = fa.FA4Backend()
    assert err.startswith("refused: ") and "device is cpu, fa4 runs on cuda" in err
    assert all(r in err for r in be.availability_reasons())        # the backend's words, not restated
    assert rec["ideal_from"] == "dense_sdpa"
    assert _row(md, f"| {SHAPE}")["FA4 dense ms"] == "n/a"
    assert f"FA4 dense not run (every shape): {err[len('refused: '):]}" in md


def test_fa4_dense_reasons_where_lvsa_cuda_or_the_gpu_lacks_it(fake_fa4, monkeypatch, capsys):
    from lvsa import devices, plugins
    from lvsa.bench import common

    monkeypatch.setattr(devices, "compute_capability", lambda d: (8, 0))
    fn, why = common.fa4_dense("cuda", torch.bfloat16, 1, 9 * 1560, 12, 12, 128)
    assert fn is None and why == list(fa.FA4Backend().extra_reasons(_h200(compute_capability=(8, 0))))
    assert len(why) == 1 and "this GPU is sm_80" in why[0]
    monkeypatch.setattr(devices, "compute_capability", lambda d: (9, 0))
    fn, why = common.fa4_dense("cuda", torch.bfloat16, 1, 9 * 1560, 12, 12, 128)
    assert why == [] and fn.__self__.name == "fa4" and fn.__name__ == "dense"
    real = plugins.backends
    monkeypatch.setattr(plugins, "backends", lambda: {k: v for k, v in real().items() if k != "fa4"})
    assert common.fa4_dense("cuda", torch.bfloat16, 1, 64, 2, 2, 64) == (None, [common.NO_FA4_BACKEND])
    with pytest.raises(SystemExit) as e:
        main(["bench", "attention", "--quick", "--dense", "sdpa"])
    assert e.value.code == 2 and "invalid choice: 'sdpa'" in capsys.readouterr().err


# ------------------------------------------------------------ bench model's best dense
def test_lvsa_dense_calls_go_through_the_one_seam_and_it_resets():
    from lvsa import ops
    from lvsa.engine import Engine

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3 * 4, 2, 8, generator=g) for _ in range(3))
    seen = []

    def kernel(q_, k_, v_, tk, tv, scale):
        seen.append((k_.shape, tk, scale))
        return torch.full_like(q_, 7.0)

    want = ops.dense_attention(q, k, v)
    with ops.dense_kernel(kernel):
        assert torch.equal(ops.dense_attention(q, k, v), torch.full_like(q, 7.0))
        with ops.dense_kernel(None):          # None: SDPA again, inside
            assert torch.equal(ops.dense_attention(q, k, v), want)
        # the engine's full-density path (a dense-by-design mask: 3 frames, within the reference)
        eng = Engine(family="wan", patches_per_frame=4, total_latent_frames=3, warn_fallback=False)
        assert torch.equal(eng.attention(q, k, v), torch.full_like(q, 7.0))
    assert torch.equal(ops.dense_attention(q, k, v), want)   # reset after the block
    assert seen[0] == (k.shape, None, pytest.approx(8 ** -0.5)) and len(seen) == 2
    # reset when the block raises, and another thread never sees this thread's kernel
    with pytest.raises(RuntimeError, match="inside"):
        with ops.dense_kernel(kernel):
            other = []
            t = threading.Thread(target=lambda: other.append(ops.dense_attention(q, k, v)))
            t.start()
            t.join()
            assert torch.equal(other[0], want)
            raise RuntimeError("inside")
    assert torch.equal(ops.dense_attention(q, k, v), want) and ops._dense_blocks == 0
    assert len(seen) == 2


def test_choice_of_the_best_dense_kernel():
    from torch.nn.attention import SDPBackend

    from lvsa.bench import model as bm

    fastest, order = bm.choose_dense({"cudnn": 11.6, "fa2": 14.0, "fa4": 9.1})
    assert fastest == "fa4" and order[:2] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    fastest, order = bm.choose_dense({"cudnn": 15.0, "fa2": 14.0, "fa4": "n/a: not Hopper"})
    assert fastest == "fa2" and order[:2] == [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    assert order[2:] == [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert bm.choose_dense({"fa4": 3.0}, sdpa=False) == ("fa4", None)
    assert bm.choose_dense({"fa4": "RuntimeError: x"}, sdpa=False) == (None, None)


def test_both_benches_name_each_dense_kernel_alike_and_read_the_old_name():
    """bench attention's --dense kernels and bench model's probe share one name per kernel
    (SDPA's FlashAttention-2 is ``fa2`` in both; bench model said ``flash``), one choice of
    the fastest, one SDPA kernel per name; model results files that say ``flash`` still read."""
    from torch.nn.attention import SDPBackend

    from lvsa.bench import attention as ba, kernels, model as bm

    assert ba.DENSE_KINDS == ("cudnn", "fa2", "fa4")
    assert ba.DENSE_LABELS == {"dense_cudnn": "cuDNN", "dense_fa2": "FA2", "dense_fa4": "FA4 dense",
                               "dense_sdpa": "SDPA"}   # the README tables' column names
    ms = {"cudnn": 15.0, "fa2": 14.0, "fa4": "n/a: not Hopper"}
    rec = {"results": {f"dense_{n}": ({"ms": t} if isinstance(t, float) else {"error": t}) for n, t in ms.items()}}
    assert ba.fastest_dense(rec) == "dense_" + bm.choose_dense(ms)[0] == "dense_fa2"
    # an older model file: FlashAttention-2 under its old name, read as fa2
    old = {"cudnn": 15.0, "flash": 14.0}
    assert bm.choose_dense(old)[1] == bm.choose_dense({"cudnn": 15.0, "fa2": 14.0})[1]
    assert kernels.sdpa_backend("flash") is kernels.sdpa_backend("fa2") is SDPBackend.FLASH_ATTENTION
    row = dict(title="Wan", T=21, batch=1, variants={"dense": {}})
    lines = bm.dense_kernel_lines([dict(row, dense_kernel="flash", dense_kernels_ms=dict(old, fa4="n/a: sm_80")),
                                   dict(row, T=81, dense_kernel="fa2", dense_kernels_ms={"cudnn": 15.0, "fa2": 14.0})])
    assert lines[2:] == ["- Wan T21 B1: FlashAttention-2 (SDPA) (fa2 14.00 ms, cudnn 15.00 ms)",
                         "- Wan T81 B1: FlashAttention-2 (SDPA) (fa2 14.00 ms, cudnn 15.00 ms)",
                         "- not a candidate (Wan T21 B1): fa4: sm_80"]


def test_probe_includes_fa4_dense_when_it_can_run(fa4_on_cpu):
    from lvsa.bench import model as bm
    from lvsa.bench.specs import get_spec

    spec = get_spec("tiny-wan")
    p = bm.probe_dense_kernels(spec, 21, 2, "cpu", torch.float32)
    assert isinstance(p["ms"]["fa4"], float) and p["fastest"] == "fa4" and p["fa4"].__name__ == "dense"
    S = 21 * spec.tokens_per_frame + spec.joint_text_tokens
    assert [c["k"] for c in fa4_on_cpu] == [(2, S, spec.heads, spec.head_dim)] * 2   # warm call, timed call


def test_probe_without_fa4_records_why():
    from lvsa.bench import model as bm
    from lvsa.bench.specs import get_spec

    p = bm.probe_dense_kernels(get_spec("tiny-wan"), 21, 1, "cpu", torch.float32)
    assert p["fastest"] is None and p["fa4"] is None and p["order"] is None
    why = "; ".join(p["fa4_why"])
    assert "device is cpu, fa4 runs on cuda" in why
    assert all(r in why for r in fa.FA4Backend().availability_reasons())
    assert "fa4" not in p["ms"]   # off CUDA, FA4 is no candidate the Markdown lists


def test_best_dense_row_runs_through_fa4_when_it_is_the_fastest(fa4_on_cpu, tmp_path):
    from lvsa.bench import model as bm
    from lvsa.bench.specs import get_spec

    assert main(["bench", "model", "--quick", "--models", "tiny-hunyuan:49@1", "--backends", "reference",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    path, data = _results(tmp_path, "model")
    (rec,) = data["records"]
    V = rec["variants"]
    assert rec["dense_kernel"] == "fa4" and isinstance(rec["dense_kernels_ms"]["fa4"], float)
    assert V["dense"]["time_s"] > 0 and V["dense"]["output_finite"]
    # FA4's dense forward ran exactly lvsa's video-query calls of the dense row: the probe's two, the
    # one-block warm-up's one, one per layer per timed forward (text queries stay on SDPA); none
    # in the diffusers and reference rows
    dense = [c for c in fa4_on_cpu if c.get("dense")]
    assert len(dense) == 2 + 1 + rec["layers"] * len(V["dense"]["samples_s"])
    assert {c["k"][1] for c in dense} == {rec["video_tokens"] + rec["text_tokens"]}
    with open(path[:-5] + ".md") as f:
        md = f.read()
    assert "- tiny HunyuanVideo 1.5 (quick) T49 B1: FlashAttention-4 dense (fa4 " in md
    assert "*best dense* ran on FlashAttention-4's dense forward" in _report(path)
    # and the row it times is the same function as diffusers' own attention
    spec = get_spec("tiny-hunyuan")
    tr = bm.build_transformer(spec, "cpu", torch.float32)
    inputs = bm.make_inputs(spec, tr, 49, 1, "cpu", torch.float32)
    ctx = bm.Context(spec, tr, "cpu", torch.float32, None)
    ref = ctx.forward(inputs)
    probe = bm.probe_dense_kernels(spec, 49, 1, "cpu", torch.float32)
    before = len(fa4_on_cpu)
    with bm.installed(ctx, "dense", 49), bm.dense_kernel(probe):
        out = ctx.forward(inputs)
    assert len(fa4_on_cpu) - before == spec.layers
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)


def _agree_on_rank(rank, world):
    from types import SimpleNamespace

    from lvsa.bench import model as bm

    # each rank probed on its own: rank 1 found cuDNN fastest, rank 0 FA4; rank 1 alone can run FA4
    fa4_fn = (lambda *a: None) if rank in (0, 1) else None
    ms = {"cudnn": 10.0 + rank * -5, "fa2": 12.0, "fa4": 9.0 + rank * 10}
    probe = {"ms": ms, "fastest": min(ms, key=ms.get), "order": None, "fa4": None, "fa4_fn": fa4_fn,
             "sdpa": False}
    got = bm.agree_dense(SimpleNamespace(world=world), probe)
    return got["fastest"], got["fa4"] is not None, dict(got["ms"])


def test_ranks_agree_on_rank_0s_best_dense_kernel():
    """Under --world-size N every rank's best dense row runs on rank 0's choice (one timed call
    per kernel per rank could differ), and FA4 only when every rank can run it."""
    from cp_harness import run_ranks

    two = run_ranks(_agree_on_rank, 2, timeout=60)
    assert all(r.error is None for r in two), [r.traceback for r in two]
    assert [r.value[:2] for r in two] == [("fa4", True), ("fa4", True)]   # rank 1 alone would pick cudnn
    three = run_ranks(_agree_on_rank, 3, timeout=60)   # rank 2 cannot run FA4: nobody uses it
    assert all(r.error is None for r in three), [r.traceback for r in three]
    assert {r.value[0] for r in three} == {"cudnn"} and not any(r.value[1] for r in three)
    assert all(r.value[2]["fa4"].startswith("n/a: not every rank") for r in three)
