"""RIFLEx (``lvsa.enable(pipe, riflex=True)``): the paper's formula, the rotary tables of the
three families against diffusers' own, the bit-exact round trip through ``disable()``, and
its composition with the sparse attention on the tiny pipelines."""
import math

import pytest
import torch

from lvsa import Config, integrations, tiny
from lvsa.integrations import riflex
from lvsa.events import Event
from lvsa.sink import DefaultSink

FAMILIES = ("wan", "hunyuan", "cogvideox")
# past each tiny model's training horizon (reference 21 / 33 / 13 latent frames)
LONG = {"wan": dict(num_frames=97, height=32, width=32, num_inference_steps=2),        # T=25
        "hunyuan": dict(num_frames=145, height=32, width=32, num_inference_steps=2),   # T=37
        "cogvideox": dict(num_frames=65, height=32, width=32, num_inference_steps=2)}  # T=17
# The tiny models' temporal RoPE has periods 6.3 and 628 latent frames (HunyuanVideo: 6.3 only), so
# at their own horizons RIFLEx has nothing to lower below T/0.9; a 5-frame reference makes the
# 6.3-frame component the intrinsic one, and every later frame extrapolation.
REF = 5


def diffusers_freqs(dim, base):
    """Temporal frequencies as diffusers' get_1d_rotary_pos_embed defines them: base^(-2i/dim)."""
    return [base ** (-(2 * i) / dim) for i in range(dim // 2)]


def first_spanning(freqs, L):
    """1-based index of the highest frequency whose period 2*pi/theta is at least L, spelled out."""
    for j, th in enumerate(freqs, start=1):
        if 2 * math.pi / th >= L:
            return j
    return None


# ------------------------------------------------------------------ the formula
@pytest.mark.parametrize("model, dim, base, L, k, period", [
    ("HunyuanVideo", 16, 256.0, 33, 4, 50),     # the authors' release: --k 4 --N_k 50 (129 frames = 33 latent)
    ("CogVideoX-5B", 16, 10000.0, 13, 2, 20),   # the authors' release: --k 2 --N_k 20 (49 frames = 13 latent)
    ("Wan 2.1", 44, 10000.0, 21, 4, 22),        # 81 frames = 21 latent
])
def test_intrinsic_index_reproduces_the_published_choices(model, dim, base, L, k, period):
    freqs = diffusers_freqs(dim, base)
    assert riflex.intrinsic_index(freqs, L) == k == first_spanning(freqs, L)
    assert round(riflex.periods(freqs)[k - 1]) == period
    # a model none of whose periods reaches L uses its slowest component
    assert riflex.intrinsic_index(freqs, 10 ** 9) == len(freqs)


def test_plan_on_wan21_dims_follows_the_paper():
    freqs = diffusers_freqs(128 - 2 * 2 * (128 // 6), 10000.0)  # Wan 2.1 head 128: 44 temporal dims
    assert len(freqs) == 22
    p = riflex.plan(freqs, reference=21, target=41)
    assert p.k == 4
    assert p.period == pytest.approx(2 * math.pi / freqs[3]) and 21 < p.period < 23
    assert p.new_theta == 0.9 * 2 * math.pi / 41               # theta'_k = 0.9 * 2pi / L'
    assert p.new_period == pytest.approx(41 / 0.9) and p.changed
    # at or below the training length nothing changes
    for T in (5, 21):
        q = riflex.plan(freqs, reference=21, target=T)
        assert not q.changed and q.new_theta == q.theta
    # lowering only: a component whose period already spans the clip keeps its frequency
    q = riflex.plan(freqs, reference=21, target=22, k=6)       # period ~51 > 22 / 0.9
    assert not q.changed
    # riflex_k picks another component; the formula is the same
    q = riflex.plan(freqs, reference=21, target=41, k=5)       # period ~33.5 < 41 / 0.9
    assert q.k == 5 and q.theta == freqs[4] and q.new_theta == 0.9 * 2 * math.pi / 41
    with pytest.raises(ValueError, match=r"riflex_k=23 is out of range.*22 temporal RoPE components"):
        riflex.plan(freqs, reference=21, target=41, k=23)


def test_config_fields_and_variables():
    c = Config.load(env={"LVSA_RIFLEX": "1", "LVSA_RIFLEX_K": "3"})
    assert c.riflex is True and c.riflex_k == 3
    d = Config.load(env={})
    assert d.riflex is False and d.riflex_k is None
    with pytest.raises(ValueError, match="LVSA_RIFLEX_K"):
        Config.load(env={"LVSA_RIFLEX_K": "0"})
    with pytest.raises(ValueError, match="LVSA_RIFLEX"):
        Config.load(env={"LVSA_RIFLEX": "maybe"})


def test_log_line_format():
    import io

    buf = io.StringIO()
    sink = DefaultSink(buf)
    sink.lvsa_event(Event("riflex", dict(k=4, period=22.06, new_period=45.56, T=41, reference=21, changed=True)))
    sink.lvsa_event(Event("riflex", dict(k=4, period=22.06, new_period=22.06, T=21, reference=21, changed=False)))
    assert buf.getvalue().splitlines() == [
        "[LVSA] riflex k=4 period 22.1->45.6 latent frames (reference=21 T_lat=41)",
        "[LVSA] riflex k=4 period 22.1->22.1 latent frames (reference=21 T_lat=21) (unchanged: T_lat <= reference)"]


# ------------------------------------------------------------------ the tables
class _Captured(Exception):
    pass


def _tables(pipe, family, num_frames, h=32, w=32):
    """``(table the model uses now, diffusers' own table)`` for a clip, each ``(cos, sin)`` as [T, P, D]."""
    tr = pipe.transformer
    lat = (num_frames - 1) // 4 + 1
    if family in ("wan", "hunyuan"):
        vs = 8 if family == "wan" else 16
        hs = torch.zeros(1, tr.config.in_channels, lat, h // vs, w // vs)
        used, own = tr.rope(hs), tr.rope.forward(hs)  # .forward bypasses the hooks: diffusers' own
    else:
        own = pipe._prepare_rotary_positional_embeddings(h, w, lat, torch.device("cpu"))
        seen = {}

        def capture(module, args, kwargs):
            seen["emb"] = kwargs["image_rotary_emb"]
            raise _Captured

        handle = tr.transformer_blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with pytest.raises(_Captured):
                tr(hidden_states=torch.zeros(1, lat, tr.config.in_channels, h // 8, w // 8),
                   encoder_hidden_states=torch.zeros(1, 16, tr.config.text_embed_dim),
                   timestep=torch.tensor([1]), image_rotary_emb=own)
        finally:
            handle.remove()
        used = seen["emb"]
    D = own[0].shape[-1]
    return [tuple(t.reshape(lat, -1, D) for t in pair) for pair in (used, own)]


def _temporal(pipe, family):
    """(number of temporal dims, RoPE base) as diffusers builds each family's table."""
    tr = pipe.transformer
    if family == "wan":
        return tr.rope.t_dim, 10000.0
    if family == "hunyuan":
        return tr.rope.rope_dim[0], tr.rope.theta
    return tr.config.attention_head_dim // 4, 10000.0


@pytest.mark.parametrize("family", FAMILIES)
def test_tables_match_diffusers_except_the_intrinsic_component(family, fresh_plugins):
    pipe = tiny.build(family)
    integrations.enable(pipe, riflex=True, reference_latent_frames=REF)
    try:
        t_dim, base = _temporal(pipe, family)
        k = first_spanning(diffusers_freqs(t_dim, base), REF)
        assert k == 1
        # past the reference: component k is at 0.9*2pi/T, every other column is diffusers' own
        (cos, sin), (cos0, sin0) = _tables(pipe, family, LONG[family]["num_frames"])
        T = cos.shape[0]
        assert T > REF
        cols = [2 * (k - 1), 2 * (k - 1) + 1]
        rest = [c for c in range(cos.shape[-1]) if c not in cols]
        assert torch.equal(cos[..., rest], cos0[..., rest]) and torch.equal(sin[..., rest], sin0[..., rest])
        new = 0.9 * 2 * math.pi / T
        f = torch.arange(T, dtype=torch.float64).view(T, 1, 1)
        for c in cols:
            torch.testing.assert_close(cos[..., c:c + 1].double(), torch.cos(f * new).expand(T, cos.shape[1], 1),
                                       rtol=0, atol=1e-6)
            torch.testing.assert_close(sin[..., c:c + 1].double(), torch.sin(f * new).expand(T, cos.shape[1], 1),
                                       rtol=0, atol=1e-6)
        assert not torch.equal(cos[..., cols], cos0[..., cols])
        # at and below the reference: diffusers' own table, bit for bit
        for nf in (4 * (REF - 1) + 1, 9):
            (cos, sin), (cos0, sin0) = _tables(pipe, family, nf)
            assert cos.shape[0] <= REF and torch.equal(cos, cos0) and torch.equal(sin, sin0)
    finally:
        integrations.disable(pipe)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_tables_unchanged_where_the_intrinsic_period_already_spans_the_clip(family, fresh_plugins, capsys):
    # at the tiny models' own horizons (21 / 13) the intrinsic component is the 628-frame one:
    # lowering only, so the tables stay diffusers' own and the line says why
    pipe = tiny.build(family)
    integrations.enable(pipe, riflex=True)
    try:
        (cos, sin), (cos0, sin0) = _tables(pipe, family, LONG[family]["num_frames"])
        assert torch.equal(cos, cos0) and torch.equal(sin, sin0)
        p = pipe._lvsa_state.riflex.last_plan
        assert p.k == 2 and not p.changed and p.target > p.reference
        assert "period 628.3->628.3 latent frames" in capsys.readouterr().err
    finally:
        integrations.disable(pipe)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_and_composition_with_sparse_attention(family, fresh_plugins, capsys):
    pipe = tiny.build(family)
    kw = LONG[family]
    buffers = {n: b.clone() for n, b in pipe.transformer.named_buffers()}
    base = tiny.run_latent(pipe, family, **kw)
    (own,) = [_tables(pipe, family, kw["num_frames"])[1]]

    integrations.enable(pipe, reference_latent_frames=REF)      # sparse attention alone
    sparse = tiny.run_latent(pipe, family, **kw)
    integrations.enable(pipe, reference_latent_frames=REF, riflex=True)   # sparse attention + RIFLEx
    with tiny.EventRecorder() as rec:
        both = tiny.run_latent(pipe, family, **kw)
    s = integrations.last_summary(pipe)
    assert s["sparse_calls"] > 0 and s["fallbacks"] == 0 and s["T"] > s["reference"]
    assert s["riflex"] == {"k": 1, "period": pytest.approx(2 * math.pi, rel=1e-6),
                           "new_period": pytest.approx(s["T"] / 0.9), "reference": REF, "target": s["T"],
                           "changed": True}
    (ev,) = rec.of("riflex")                                    # one line per generation
    assert ev["changed"] and ev["T"] == s["T"] and ev["reference"] == s["reference"]
    assert ev["new_period"] == pytest.approx(s["T"] / 0.9)
    err = capsys.readouterr().err
    assert err.count("[LVSA] riflex k=") == 1
    assert f"->{s['T'] / 0.9:.1f} latent frames (reference={s['reference']} T_lat={s['T']})" in err
    assert torch.isfinite(both).all() and not torch.equal(both, sparse)

    integrations.disable(pipe)                                  # the original embedding, exactly
    assert torch.equal(tiny.run_latent(pipe, family, **kw), base)
    used, own_again = _tables(pipe, family, kw["num_frames"])
    for a, b, c in zip(used, own_again, own):
        assert torch.equal(a, b) and torch.equal(a, c)
    for n, b in pipe.transformer.named_buffers():
        assert torch.equal(b, buffers[n])


@pytest.mark.parametrize("family", FAMILIES)
def test_tables_are_built_once_per_geometry_not_per_forward(family, fresh_plugins, monkeypatch):
    # every denoising step runs the transformer (twice with CFG), each forward hands the hooks
    # diffusers' table: RIFLEx reads its frequencies and builds its table once, then reuses them
    built, read, forwards = [], [], []
    real_apply, real_read = riflex.apply_plan, riflex.table_frequencies
    monkeypatch.setattr(riflex, "apply_plan", lambda *a: built.append(a[2]) or real_apply(*a))
    monkeypatch.setattr(riflex, "table_frequencies", lambda *a: read.append(a[2]) or real_read(*a))
    pipe = tiny.build(family)
    pipe.transformer.register_forward_pre_hook(lambda m, a: forwards.append(1))
    kw = dict(LONG[family], num_inference_steps=3)
    integrations.enable(pipe, riflex=True, reference_latent_frames=REF)
    try:
        first = tiny.run_latent(pipe, family, **kw)
        T = integrations.last_summary(pipe)["T"]
        assert len(forwards) >= 3 and built == [T] and read == [T]
        assert integrations.last_summary(pipe)["riflex"]["changed"]
        # the next generation of the same geometry builds nothing; another length builds its own
        again = tiny.run_latent(pipe, family, **kw)
        assert built == [T] and torch.equal(again, first)
        tiny.run_latent(pipe, family, **dict(kw, num_frames=kw["num_frames"] + 8))
        T2 = integrations.last_summary(pipe)["T"]
        assert T2 == T + 2 and built == [T, T2] and read == [T]
        # the same latent as a RIFLEx that builds its table on every forward
        monkeypatch.setattr(riflex, "TABLE_CACHE", 0)
        integrations.enable(pipe, riflex=True, reference_latent_frames=REF)  # a new RIFLEx: nothing kept
        n = len(built)
        assert torch.equal(tiny.run_latent(pipe, family, **kw), first) and len(built) - n >= 3
    finally:
        integrations.disable(pipe)


def test_changes_nothing_at_or_below_the_reference(fresh_plugins, capsys):
    pipe = tiny.build("wan")
    kw = LONG["wan"]
    integrations.enable(pipe, reference_latent_frames=25)      # T=25: dense by design
    plain = tiny.run_latent(pipe, "wan", **kw)
    integrations.enable(pipe, reference_latent_frames=25, riflex=True)
    capsys.readouterr()
    assert torch.equal(tiny.run_latent(pipe, "wan", **kw), plain)
    err = capsys.readouterr().err
    assert "[LVSA] riflex k=2 period 628.3->628.3 latent frames (reference=25 T_lat=25) (unchanged: T_lat <= " in err
    integrations.disable(pipe)


def test_riflex_k_overrides_the_index_and_is_checked(fresh_plugins, monkeypatch, capsys):
    pipe = tiny.build("wan")                                   # 4 temporal dims: periods 6.3 and 628
    monkeypatch.setenv("LVSA_RIFLEX", "1")
    monkeypatch.setenv("LVSA_RIFLEX_K", "1")
    integrations.enable(pipe)
    try:
        (cos, sin), (cos0, sin0) = _tables(pipe, "wan", LONG["wan"]["num_frames"])
        T = cos.shape[0]
        # component 1 instead of the automatic 2: columns 0-1 lowered, columns 2-3 untouched
        assert pipe._lvsa_state.riflex.last_plan.k == 1
        assert torch.equal(cos[..., 2:], cos0[..., 2:]) and torch.equal(sin[..., 2:], sin0[..., 2:])
        f = torch.arange(T, dtype=torch.float64)
        torch.testing.assert_close(cos[:, 0, 0].double(), torch.cos(f * 0.9 * 2 * math.pi / T), rtol=0, atol=1e-6)
        assert "[LVSA] riflex k=1 period 6.3->27.8" in capsys.readouterr().err
    finally:
        integrations.disable(pipe)
    monkeypatch.setenv("LVSA_RIFLEX_K", "3")
    with pytest.raises(ValueError, match=r"riflex_k=3 is out of range: this Wan transformer has 2 temporal"):
        integrations.enable(pipe)
    assert not integrations.is_enabled(pipe)
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for n, m in pipe.transformer.named_modules()
               if n.endswith("attn1"))


def test_cogvideox_without_rope_is_refused_clearly(fresh_plugins):
    pipe = tiny.build("cogvideox")
    pipe.transformer.register_to_config(use_rotary_positional_embeddings=False)
    with pytest.raises(ValueError, match="no rotary position embedding.*drop riflex"):
        integrations.enable(pipe, riflex=True)
    assert not integrations.is_enabled(pipe)
    integrations.enable(pipe)  # without RIFLEx it is fine
    integrations.disable(pipe)


def test_generate_riflex_flag(tmp_path, monkeypatch, fresh_plugins, capsys):
    from lvsa.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--height", "32", "--width", "32", "--steps", "2", "--riflex",
                 "--reference-latent-frames", str(REF), "--output-latent", "lat.pt"]) == 0
    err = capsys.readouterr().err
    assert err.count("[LVSA] riflex k=1 period 6.3->27.8 latent frames (reference=5 T_lat=25)") == 1
    assert "-> SPARSE" in err


def test_a_table_that_does_not_match_the_geometry_is_left_alone_loudly(fresh_plugins):
    from lvsa.engine import Engine

    rx = riflex.Riflex(Engine(family="wan", riflex=True), "wan")
    cos, sin = torch.rand(1, 50, 1, 12), torch.rand(1, 50, 1, 12)  # half of T*P=25*4: a context-parallel shard
    with tiny.EventRecorder() as rec:
        out = rx.table(cos, sin, 25, 4, 4)
    assert out[0] is cos and out[1] is sin
    (w,) = rec.of("warning")
    assert "50 rows, not T_lat*P=25*4" in w["message"] and "unchanged" in w["message"]


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_under_lvsa_context_parallelism_ranks_get_the_single_process_latent(family, fresh_plugins):
    # RIFLEx's hooks run before lvsa's split hooks, so every rank lowers the whole table
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from cp_harness import run_ranks

    pipe = tiny.build(family)
    kw = dict(LONG[family], num_inference_steps=1)
    integrations.enable(pipe, riflex=True, reference_latent_frames=REF)
    single = tiny.run_latent(pipe, family, **kw)
    integrations.disable(pipe)

    def case(rank, world):
        integrations.enable(pipe, riflex=True, reference_latent_frames=REF, context_parallel="ulysses")
        with tiny.EventRecorder() as rec:
            out = tiny.run_latent(pipe, family, **kw)
        return out, [e["message"] for e in rec.of("warning") if "riflex" in e["message"]], \
            integrations.last_summary(pipe)["riflex"]

    for r in run_ranks(case, 2):
        assert r.finished and r.error is None, f"rank {r.rank}: {r.error}\n{r.traceback}"
        out, warnings, rx = r.value
        assert warnings == [] and rx["changed"] and rx["k"] == 1
        torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ inference mode, then autograd
def _transformer_inputs(pipe, family, num_frames, h=32, w=32):
    """Transformer forward arguments for one clip (CogVideoX: with the pipeline's rotary table)."""
    tr = pipe.transformer
    lat = (num_frames - 1) // 4 + 1
    g = torch.Generator().manual_seed(3)
    if family == "wan":
        return dict(hidden_states=torch.randn(1, 16, lat, h // 8, w // 8, generator=g), timestep=torch.tensor([500]),
                    encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)
    return dict(hidden_states=torch.randn(1, lat, tr.config.in_channels, h // 8, w // 8, generator=g),
                encoder_hidden_states=torch.randn(1, 16, tr.config.text_embed_dim, generator=g),
                timestep=torch.tensor([500]), return_dict=False,
                # built per call, so that under inference_mode the pipeline's table is an inference tensor
                image_rotary_emb=lambda: pipe._prepare_rotary_positional_embeddings(h, w, lat, torch.device("cpu")))


def _call(tr, inputs):
    return tr(**{k: v() if callable(v) else v for k, v in inputs.items()})[0]


@pytest.mark.parametrize("family", ["wan", "cogvideox"])  # a rotary-module hook; the transformer's pre-hook
def test_a_table_cached_under_inference_mode_serves_a_later_forward_with_autograd(family, fresh_plugins,
                                                                                   monkeypatch):
    # generation under torch.inference_mode() caches an inference tensor; fine-tuning (or any
    # forward under autograd) on the same geometry must not be handed it: autograd refuses to
    # save an inference tensor for backward
    built = []
    real_apply = riflex.apply_plan
    monkeypatch.setattr(riflex, "apply_plan", lambda *a: built.append(torch.is_inference_mode_enabled())
                        or real_apply(*a))  # whether each build ran in inference mode
    pipe = tiny.build(family)
    tr = pipe.transformer
    inputs = _transformer_inputs(pipe, family, LONG[family]["num_frames"])
    integrations.enable(tr, riflex=True, reference_latent_frames=REF)
    try:
        with torch.inference_mode():
            want = _call(tr, inputs)
        assert built == [False] and tr._lvsa_state.riflex.last_plan.changed
        tr.requires_grad_(True)
        got = _call(tr, inputs)
        got.square().mean().backward()
        grads = [p.grad for p in tr.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        assert built == [False]  # built once, as a normal tensor, and reused under autograd
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
        with torch.inference_mode():
            assert torch.equal(_call(tr, inputs), want)
        tr.zero_grad()
        _call(tr, inputs).square().mean().backward()
        assert built == [False]
    finally:
        tr.requires_grad_(False)
        integrations.disable(tr)


def test_a_table_that_requires_grad_is_not_cached(fresh_plugins):
    # a cached table inside an autograd graph would make the next backward run through the
    # graph of the forward that built it (freed after its first backward)
    from lvsa.engine import Engine

    rx = riflex.Riflex(Engine(family="wan", riflex=True, reference_latent_frames=REF), "wan")
    T, P = 25, 4
    f = torch.arange(T, dtype=torch.float32).repeat_interleave(P).view(1, T * P, 1, 1)
    theta = torch.tensor([1.0, 0.01]).repeat_interleave(2)  # periods 6.3 and 628 frames, interleaved pairs
    scale = torch.ones(4, requires_grad=True)                # a learnable rotary table upstream
    for _ in range(2):
        ang = f * theta * scale
        cos, sin = rx.table(ang.cos(), ang.sin(), T, P, 4, source="rope", grid=(T, 2, 2))
        assert rx.last_plan.changed
        (cos.sum() + sin.sum()).backward()
    assert scale.grad is not None and torch.isfinite(scale.grad).all()
    assert rx._tables == {}
