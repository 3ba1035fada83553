"""Context parallelism on the CPU: forked gloo ranks (tests/cp_harness.py) against one process.

Every rank's result must equal the single-process lvsa result: bit for bit where the
arithmetic is the same per row/head (reference backend, float32), within a float32
tolerance through a whole transformer otherwise.
"""
import math
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cp_harness import run_ranks  # noqa: E402

from lvsa import integrations, tiny  # noqa: E402
from lvsa.tiny import EventRecorder  # noqa: E402

STEPS = 2


def _ok(results):
    for r in results:
        assert r.finished, f"rank {r.rank} hung"
        assert r.error is None, f"rank {r.rank}: {r.error}\n{r.traceback}"
    return [r.value for r in results]


def _lvsa_lines(text):
    return [ln for ln in text.splitlines() if "[LVSA" in ln]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def wan():
    pipe = tiny.build("wan")
    integrations.enable(pipe)
    base = tiny.run_latent(pipe, "wan", num_inference_steps=STEPS)
    integrations.disable(pipe)
    return pipe, base


@pytest.fixture(scope="module")
def text_pipes():
    """The tiny HunyuanVideo 1.5 / CogVideoX pipelines and their single-process lvsa latents."""
    built = {}

    def get(family):
        if family not in built:
            pipe = tiny.build(family)
            integrations.enable(pipe)
            built[family] = (pipe, tiny.run_latent(pipe, family, num_inference_steps=STEPS))
            integrations.disable(pipe)
        return built[family]
    return get


def _wan_transformer(heads, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024).eval()


def _wan_inputs(T, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, T, h, w, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)


def _forward(tr, inputs, **settings):
    """One transformer forward under lvsa (a bare transformer: geometry from the latent)."""
    integrations.enable(tr, **settings)
    try:
        with torch.no_grad():
            return tr(**inputs)[0]
    finally:
        integrations.disable(tr)


# ------------------------------------------------------------------ Ulysses
def _wan_pipeline_case(rank, world, pipe, mode):
    integrations.enable(pipe, context_parallel=mode)
    with EventRecorder() as rec:
        out = tiny.run_latent(pipe, "wan", num_inference_steps=STEPS)
    return out, [e["reason"] for e in rec.of("fallback")], integrations.last_summary(pipe)


def test_ulysses_w2_wan_pipeline_is_bit_identical_and_only_rank0_prints(wan):
    pipe, base = wan
    res = run_ranks(_wan_pipeline_case, 2, pipe, "ulysses")
    for out, fallbacks, summary in _ok(res):
        assert torch.equal(out, base)  # reference backend, float32: bit for bit
        assert fallbacks == [] and summary["sparse_calls"] > 0
    assert any("engaged (wan)" in ln for ln in _lvsa_lines(res[0].stderr))
    assert _lvsa_lines(res[1].stderr) == []  # only rank 0 prints [LVSA] lines


def test_log_all_ranks_prefixes_every_rank(wan):
    pipe, _ = wan
    res = run_ranks(_wan_pipeline_case, 2, pipe, "ulysses", env={"LVSA_LOG_ALL_RANKS": "1"})
    _ok(res)
    for r in res:
        lines = _lvsa_lines(r.stderr)
        assert lines and all(ln.startswith(f"[rank {r.rank}] [LVSA") for ln in lines)


def _transformer_case(rank, world, tr, inputs, mode):
    from lvsa.engine import Engine

    seen = set()  # (query rows, query heads, key rows) each attention call of this rank got
    original = Engine.attention

    def spy(self, q, k, v, *a, **kw):
        seen.add((q.shape[1], q.shape[2], k.shape[1]))
        return original(self, q, k, v, *a, **kw)

    Engine.attention = spy  # a forked worker: the parent's class is untouched
    try:
        out = _forward(tr, inputs, context_parallel=mode)
    finally:
        Engine.attention = original
    # lvsa.disable removed every split/gather hook it installed
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tr.modules())
    return out, seen


def _check_split(results, base, S, H, world, mode):
    """Every rank equals the single process AND really computed only its share."""
    share = {(S, H // world, S)} if mode == "ulysses" else {(S // world, H, S)}
    for out, seen in results:
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
        assert seen == share, f"{mode}: attention calls saw (rows, heads, keys) {seen}, expected {share}"


def test_ulysses_w3_wan_transformer():
    tr = _wan_transformer(heads=6)
    inputs = _wan_inputs(T=24, h=8, w=8)  # S = 24 * 16 = 384 = 3 * 128
    base = _forward(tr, inputs)
    _check_split(_ok(run_ranks(_transformer_case, 3, tr, inputs, "ulysses")), base, 384, 6, 3, "ulysses")


# ----------------------------------------------------------------- sequence
def test_sequence_w3_two_heads_frames_straddle_ranks():
    tr = _wan_transformer(heads=2)
    inputs = _wan_inputs(T=25, h=6, w=8)  # P = 12, S = 300: 100 rows per rank, frames cut
    base = _forward(tr, inputs)
    # 2 heads on 3 ranks: auto takes sequence mode
    _check_split(_ok(run_ranks(_transformer_case, 3, tr, inputs, "auto")), base, 300, 2, 3, "sequence")


def test_ulysses_refuses_heads_that_do_not_divide():
    tr = _wan_transformer(heads=2)
    res = run_ranks(_transformer_case, 3, tr, _wan_inputs(T=25, h=6, w=8), "ulysses")
    for r in res:
        assert r.finished and "context_parallel='sequence'" in (r.error or "")


@pytest.mark.parametrize("world,heads,mode", [(4, 12, "ulysses"), (8, 8, "ulysses"), (8, 12, "auto")])
def test_four_and_eight_ranks(world, heads, mode):
    """Issue 17 on the CPU: Ulysses where heads divide, sequence mode for Wan 1.3B-like 12 heads on 8."""
    tr = _wan_transformer(heads=heads)
    inputs = _wan_inputs(T=24, h=6, w=8)  # P = 12, S = 288: 36 rows per rank on 8 (frames cut)
    base = _forward(tr, inputs)
    split = "ulysses" if heads % world == 0 else "sequence"
    _check_split(_ok(run_ranks(_transformer_case, world, tr, inputs, mode, timeout=120)), base, 288, heads,
                 world, split)


# --------------------------------------------------------------- text paths
@pytest.mark.parametrize("family", ["hunyuan", "cogvideox"])
@pytest.mark.parametrize("mode", ["ulysses", "sequence"])
def test_text_queries_see_the_whole_video(family, mode, text_pipes):
    pipe, base = text_pipes(family)

    def case(rank, world):
        integrations.enable(pipe, context_parallel=mode)
        with EventRecorder() as rec:
            out = tiny.run_latent(pipe, family, num_inference_steps=STEPS)
        return out, [e["reason"] for e in rec.of("fallback")]

    for out, fallbacks in _ok(run_ranks(case, 2)):
        assert fallbacks == []
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ diffusers' own CP
def _diffusers_cp(pipe, **cp_kwargs):
    from diffusers import ContextParallelConfig

    # diffusers 0.42.1 places each rank on device `rank % torch.accelerator.device_count()`,
    # which divides by zero on a machine without an accelerator: one CPU "device" per rank
    torch.accelerator.device_count = lambda: 1
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(**cp_kwargs))


@pytest.mark.parametrize("lvsa_first", [False, True])
def test_wan_through_diffusers_enable_parallelism(wan, lvsa_first):
    pipe, base = wan

    def case(rank, world):
        if lvsa_first:
            integrations.enable(pipe)
        _diffusers_cp(pipe, ulysses_degree=world)
        if not lvsa_first:
            integrations.enable(pipe)  # no context_parallel argument: diffusers' Ulysses group is used
        with EventRecorder() as rec:
            out = tiny.run_latent(pipe, "wan", num_inference_steps=STEPS)
        return out, [e["reason"] for e in rec.of("fallback")], integrations.last_summary(pipe)

    for out, fallbacks, summary in _ok(run_ranks(case, 2)):
        assert fallbacks == [] and summary["sparse_calls"] > 0
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


def test_diffusers_ulysses_anything_hands_off_with_the_fallback_line(wan):
    pipe, _ = wan
    dense = tiny.run_latent(pipe, "wan", num_inference_steps=1)  # lvsa off

    def case(rank, world):
        _diffusers_cp(pipe, ulysses_degree=world, ulysses_anything=True)
        integrations.enable(pipe)
        with EventRecorder() as rec:
            out = tiny.run_latent(pipe, "wan", num_inference_steps=1)
        return out, sorted({e["reason"] for e in rec.of("fallback")}), integrations.last_summary(pipe)

    res = run_ranks(case, 2)
    for out, reasons, summary in _ok(res):
        assert reasons == ["context_parallel"] and summary["sparse_calls"] == 0
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)  # diffusers' own (dense) CP ran
    assert "reason=context_parallel" in res[0].stderr


# ------------------------------------------- the collectives: negative dims, empty tensors
def _edge_case(rank, world, max_slices):
    from lvsa.errors import ContextParallelError
    from lvsa.parallel import ContextParallel

    cp = ContextParallel(mode="ulysses")
    cp.MAX_GATHER_SLICES = max_slices  # 0: always the one collective along dim 0 and the reorder

    def mine(r, shape, dtype=torch.float32):  # what rank r holds: different on every rank
        return (torch.arange(math.prod(shape), dtype=torch.float64).view(shape) + 1000 * r).to(dtype)

    shape = (2, 3, 4, 5)
    for dim in range(-4, 4):  # negative dims as torch reads them, on both gather paths
        got = cp.all_gather(mine(rank, shape), dim)
        assert torch.equal(got, torch.cat([mine(r, shape) for r in range(world)], dim)), dim
        assert got.is_contiguous()
        full = torch.cat([mine(r, shape) for r in range(world)], dim)
        assert torch.equal(cp.split(full, dim), mine(rank, shape)), dim
    # tensors without elements: the empty result of the right shape and dtype
    for empty in ((0, 3, 4), (2, 0, 4), (2, 3, 0), (0,)):
        for dim in range(-len(empty), len(empty)):
            got = cp.all_gather(mine(rank, empty, torch.bfloat16), dim)
            want = torch.cat([mine(r, empty, torch.bfloat16) for r in range(world)], dim)
            assert got.shape == want.shape and got.dtype == torch.bfloat16, (empty, dim, got.shape)
            assert cp.split(want, dim).shape == empty
    for B, s in ((0, 3), (1, 0)):  # an empty batch / an empty sequence shard through Ulysses
        heads = cp.seq_to_heads(torch.zeros(B, s, 2 * world, 4))
        assert heads.shape == (B, s * world, 2, 4)
        assert cp.heads_to_seq(heads).shape == (B, s, 2 * world, 4)
    # what cannot work says why, before any collective (every rank alike: no hang)
    errors = []
    for call in (lambda: cp.all_gather(mine(rank, shape), 4), lambda: cp.all_gather(mine(rank, shape), -5),
                 lambda: cp.split(mine(rank, shape), -5), lambda: cp.all_gather(torch.tensor(1.0), 0),
                 lambda: cp.seq_to_heads(torch.zeros(1, 3, 2 * world + 1, 4)),
                 lambda: cp.seq_to_heads(torch.zeros(3, 2 * world, 4)),
                 lambda: cp.heads_to_seq(torch.zeros(1, 2 * world + 1, 2, 4))):
        try:
            call()
        except (IndexError, ValueError, ContextParallelError) as e:
            errors.append(f"{type(e).__name__}: {e}")
        else:
            errors.append(None)
    # under autograd the exchanges (no backward) refuse rather than drop the gradients
    grad = mine(rank, (1, 2, 2 * world, 4)).requires_grad_()
    for call in (lambda: cp.all_gather(grad, 1), lambda: cp.seq_to_heads(grad), lambda: cp.heads_to_seq(grad)):
        try:
            call()
        except ContextParallelError as e:
            errors.append(f"{type(e).__name__}: {e}")
        else:
            errors.append(None)
    with torch.no_grad():   # inference: fine
        assert cp.all_gather(grad, 1).shape == (1, 2 * world, 2 * world, 4)
    # and the group still works afterwards
    assert torch.equal(cp.all_gather(mine(rank, (3,)), -1), torch.cat([mine(r, (3,)) for r in range(world)]))
    return errors


@pytest.mark.parametrize("max_slices", [8, 0])
def test_collectives_take_negative_dims_and_empty_tensors(max_slices):
    for errors in _ok(run_ranks(_edge_case, 2, max_slices, timeout=60)):
        out4, neg5, split5, scalar, heads, ndim, seq, *grads = errors
        assert len(grads) == 3 and all(g and "context parallelism is inference-only" in g
                                       and "torch.no_grad()" in g for g in grads), grads
        assert out4.startswith("IndexError: context parallel all_gather: dim 4 is out of range for a 4-D tensor")
        assert "(expected -4 ... 3)" in out4 and "dim -5 is out of range" in neg5
        assert split5.startswith("IndexError: context parallel split: dim -5")
        assert scalar.startswith("ValueError") and "0-d tensor" in scalar
        assert heads.startswith("ContextParallelError") and "5 heads do not divide by 2 ranks" in heads
        assert ndim.startswith("ValueError") and "[batch, tokens, heads, head_dim]" in ndim and "(3, 4, 4)" in ndim
        assert seq.startswith("ContextParallelError") and "5 tokens does not divide by 2 ranks" in seq


# ---------------------------------------------------------------- failures
def test_a_failing_rank_brings_the_group_down_naming_rank_and_cause():
    tr = _wan_transformer(heads=2)
    inputs = _wan_inputs(T=24, h=8, w=8)

    def case(rank, world):
        integrations.enable(tr, context_parallel="ulysses")
        if rank == 1:
            eng = integrations.engine_of(tr)

            def boom(*a, **k):
                raise RuntimeError("injected failure")
            eng.attention = boom
        with torch.no_grad():
            return tr(**inputs)[0]

    res = run_ranks(case, 2, timeout=30, dist_timeout=20)
    assert all(r.finished for r in res)
    assert "injected failure" in res[1].error
    assert "rank 1" in res[0].error and "injected failure" in res[0].error  # the peer's cause, not a hang


def test_a_rank_that_never_reaches_the_collective_times_out():
    tr = _wan_transformer(heads=2)
    inputs = _wan_inputs(T=24, h=8, w=8)

    def case(rank, world):
        if rank == 1:
            time.sleep(2.5)  # never joins the all-to-all in time (rank 0 waits 1 s)
            return None
        integrations.enable(tr, context_parallel="ulysses")
        with torch.no_grad():
            return tr(**inputs)[0]

    res = run_ranks(case, 2, timeout=30, dist_timeout=1)
    assert res[0].finished and "LVSA_DIST_TIMEOUT=1" in res[0].error and "never reached" in res[0].error


def test_ranks_that_disagree_on_the_step_raise_under_lvsa_check():
    tr = _wan_transformer(heads=2)
    inputs = _wan_inputs(T=24, h=8, w=8)

    def case(rank, world):
        integrations.enable(tr, context_parallel="ulysses")
        integrations.engine_of(tr).set_step(rank)  # rank 1 thinks it is one step further
        with torch.no_grad():
            return tr(**inputs)[0]

    res = run_ranks(case, 2, env={"LVSA_CHECK": "1"})
    for r in res:
        assert r.finished and "ranks disagree" in (r.error or "") and "rank 1: (24, 16, 0, 1" in r.error


def test_a_hand_off_under_lvsa_context_parallelism_is_refused_naming_the_ranks():
    # a call lvsa would hand to the original processor (here: an explicit mask) sees only
    # this rank's shard under lvsa's split: an error naming the world size, not a wrong answer
    tr = _wan_transformer(heads=2)

    def case(rank, world):
        integrations.enable(tr, context_parallel="ulysses")
        attn = tr.blocks[0].attn1
        hs = torch.zeros(1, 8, attn.inner_dim)
        return attn.processor(attn, hs, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))

    for r in run_ranks(case, 2):
        assert r.finished and "ContextParallelError" in (r.error or "") + (r.traceback or "")
        assert "context parallel over 2 ranks" in r.error and "(attention_mask)" in r.error
        assert "only this rank's 1/2 of the tokens" in r.error


def test_context_parallel_without_a_process_group_says_how_to_launch():
    from lvsa.errors import ContextParallelError

    tr = _wan_transformer(heads=2)
    with pytest.raises(ContextParallelError, match="torchrun"):
        integrations.enable(tr, context_parallel="ulysses")
    assert not integrations.is_enabled(tr)


# -------------------------------------------------------- the GPU check script
def test_cp_check_script_cpu_path(tmp_path):
    """benchmarks/cp_check.py (what runs on the GPUs under torchrun) on its --small CPU
    path: every case passes and the JSON + Markdown results are written by rank 0 only."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cp_check.py")
    spec = importlib.util.spec_from_file_location("cp_check", path)
    cp_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp_check)

    def case(rank, world):
        return cp_check.main(["--device", "cpu", "--small", "--out", str(tmp_path), "--tag", "t"])

    assert _ok(run_ranks(case, 2, timeout=120)) == [0, 0]
    data = json.loads((tmp_path / "cp-check-t.json").read_text())
    ran = [r for r in data["results"] if "skipped" not in r]
    assert {(r["kind"], r["mode"]) for r in ran} == {(k, m) for k in ("attention", "transformer")
                                                     for m in ("ulysses", "sequence")}
    assert all(r["pass"] and r["bit_identical"] for r in ran)
    assert "| transformer | small T25 B1 | reference | sequence |" in (tmp_path / "cp-check-t.md").read_text()


# ------------------------------------------------------------- command line
def _lvsa_cmd(tmp_path, name, ranks=None, extra=()):
    import subprocess

    env = {**os.environ, "LVSA_CHECK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = ([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", str(ranks),
                 "--master-port", str(__import__("cp_harness").free_port())] if ranks else [sys.executable])
    cmd = launcher + ["-m", "lvsa", "generate", "--steps", "2", "--output-latent", str(tmp_path / name), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_torchrun_generate_gives_the_single_process_latent(tmp_path):
    one = _lvsa_cmd(tmp_path, "one.pt")
    two = _lvsa_cmd(tmp_path, "two.pt", ranks=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.equal(a["latent"], b["latent"])
    assert b["metadata"]["lvsa"]["sparse_calls"] > 0 and b["metadata"]["lvsa"]["fallbacks"] == 0
    said = two.stdout + two.stderr
    assert said.count("engaged (wan)") == 1 and said.count("lvsa generate: done") == 1  # rank 0 only


def test_generate_checks_divisibility_up_front_and_only_rank0_says_so(tmp_path):
    from lvsa import cli

    def case(rank, world):  # `lvsa generate` inside an existing 3-rank group (as torchrun makes)
        return cli.main(["generate", "--steps", "1", "--output-latent", str(tmp_path / "x.pt")])

    res = run_ranks(case, 3)
    assert _ok(res) == [2, 2, 2] and not (tmp_path / "x.pt").exists()
    assert "400 video tokens (T_lat x P) do not divide by 3 ranks" in res[0].stderr  # the tiny Wan
    assert "--nproc-per-node 2 / 4 / 5 / 8" in res[0].stderr
    assert res[1].stderr == res[2].stderr == ""


def test_exchange_sizes_from_the_mask():
    from lvsa.mask import dense_mask
    from lvsa.parallel import exchange_sizes
    from lvsa.schedule import plan_schedule

    dense = exchange_sizes(dense_mask(8), P=10, world_size=4, heads=2, head_dim=8)
    assert dense["minimal_bytes_max"] == dense["allgather_bytes"] == 60 * 2 * 2 * 8 * 2  # all 60 other tokens
    sparse = plan_schedule(81, 3, 1, 21).mask(0)  # kfi 6: 14 globals + window
    r = exchange_sizes(sparse, P=1560, world_size=2, heads=12, head_dim=128)
    assert r["minimal_bytes_max"] < 0.35 * r["allgather_bytes"]
    assert r["ulysses_bytes"] == 4 * (81 * 1560 // 2) * 12 * 128 * 2 // 2
