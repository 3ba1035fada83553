"""The planner against DESIGN.md §2: worked values, rules, and a literal re-implementation."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from lvsa.schedule import (
    PRESETS, compute_key_frame_interval, get_preset, latent_frames, patches_per_frame, plan_schedule)


# ---------------------------------------------------------------- the spec, literally
def spec_kfi(T, W, n, ref, scale):
    sref = max(n + 1, math.floor(ref * scale))
    if T <= sref:
        return 1
    target = max(n, sref - min(2 * W + 1, T))
    strict = None
    for k in range(T, 0, -1):
        if len(set(range(n)) | set(range(0, T, k))) >= target:
            strict = k
            break
    m = 2 * W + n
    fallback = math.ceil(max(T - m, sref - m) / max(sref - m, 1))
    return max(strict, fallback)


def spec_globals(T, kfi, n, o):
    return set(range(min(n, T))) | {(o + i * kfi) % T for i in range(math.ceil(T / kfi))}


def spec_window(T, W, G, f, expand=True):
    # DESIGN.md: "extend lo down by one (if possible), then hi up by one (if possible)" while
    # short. The condition is re-checked after each single move: that reading reproduces the
    # worked sparsities (0.741 at T=81, 0.826 at T=121); moving both before re-checking gives
    # 0.735 / 0.820 (test_the_other_reading_contradicts_the_worked_values).
    lo, hi = max(0, min(f - W, T - 1 - 2 * W)), min(T - 1, max(f + W, 2 * W))
    if not expand:
        return lo, hi
    need = min(2 * W + 1, T - len(G))

    def count():
        return sum(1 for x in range(lo, hi + 1) if x not in G)

    while count() < need:
        moved = False
        if lo > 0:
            lo -= 1
            moved = True
        if count() >= need:
            break
        if hi < T - 1:
            hi += 1
            moved = True
        if not moved:
            break
    return lo, hi


# ---------------------------------------------------------------------- worked values
@pytest.mark.parametrize("ref,T,kfi,sparsity", [
    (21, 33, 2, None), (21, 41, 3, None), (21, 81, 6, 0.741), (21, 121, 9, 0.826),
    (33, 49, 2, None), (33, 65, 3, None)])
def test_design_worked_values(ref, T, kfi, sparsity):
    s = plan_schedule(T, 3, 1, ref)
    assert s.key_frame_interval == kfi
    if sparsity is not None:
        assert round(s.mask_for_step(0).sparsity(), 3) == sparsity


@pytest.mark.parametrize("T,density", [(41, 0.512), (81, 0.259), (121, 0.174), (21, 1.0)])
def test_anchor_densities_wan(T, density):
    assert round(plan_schedule(T, 3, 1, 21).mask(0).density(), 3) == density


@pytest.mark.parametrize("T,density", [(49, 0.653), (65, 0.446)])
def test_anchor_densities_hunyuan(T, density):
    assert round(plan_schedule(T, 3, 1, 33).mask(0).density(), 3) == density


def test_dense_at_or_below_reference():
    for T in (1, 5, 21):
        s = plan_schedule(T, 3, 1, 21)
        assert s.key_frame_interval == 1 and s.dense
        assert s.mask_for_step(7).is_dense
    assert not plan_schedule(22, 3, 1, 21).dense


def test_sparsity_scale_changes_budget():
    dense = plan_schedule(33, 3, 1, 21, scale=2.0)  # sref = 42 >= 33: dense by design
    assert dense.dense
    sparser = plan_schedule(81, 3, 1, 21, scale=0.5)
    assert sparser.key_frame_interval > plan_schedule(81, 3, 1, 21).key_frame_interval
    assert sparser.mask(0).sparsity() > plan_schedule(81, 3, 1, 21).mask(0).sparsity()


def test_explicit_kfi_and_rotation():
    s = plan_schedule(40, 2, 1, 21, kfi=16)
    assert not s.auto and s.key_frame_interval == 16 and len(s.masks) == 16
    assert s.mask_for_step(0).globals == (0, 16, 32)
    assert s.mask_for_step(5).globals == (0, 5, 21, 37)
    assert s.mask_for_step(21) is s.mask_for_step(5)  # a lookup, cached
    off = plan_schedule(40, 2, 1, 21, kfi=16, rotate=False)
    assert len(off.masks) == 1 and off.mask_for_step(5).globals == (0, 16, 32)


def test_first_frames_never_move():
    s = plan_schedule(81, 3, 2, 21)
    for o in range(s.key_frame_interval):
        assert {0, 1} <= set(s.mask(o).globals)


def test_window_zero_is_globals_only():
    s = plan_schedule(30, 0, 1, 10)
    m = s.mask(1)
    assert m.windows is None
    assert all(m.attended(f) == m.globals for f in range(30))


def test_plain_windows_do_not_expand():
    s = plan_schedule(81, 3, 1, 21, expand=False)
    m = s.mask(0)
    for f in range(81):
        lo, hi = m.window(f)
        assert hi - lo == 6


def test_context_parallel_boundaries_are_fixed_globals():
    T, P, W = 81, 1560, 3
    s = plan_schedule(T, W, 1, 21, world_size=4, tokens_per_frame=P)
    bounds = [(r * T * P // 4) // P for r in (1, 2, 3)]
    want = {f for b in bounds for f in range(b - W, b + W + 1)}
    assert set(s.boundary_frames) == want
    for o in range(s.key_frame_interval):
        assert want <= set(s.mask(o).globals)
    with pytest.raises(ValueError, match="tokens_per_frame"):
        plan_schedule(T, W, 1, 21, world_size=2)


def test_cache_returns_same_object_and_lookup_is_cheap():
    a = plan_schedule(121, 3, 1, 21, tokens_per_frame=1560)
    b = plan_schedule(121, 3, 1, 21, tokens_per_frame=1560)
    assert a is b
    assert a.mask_for_step(3) is a.masks[3]


@pytest.mark.parametrize("kw,match", [
    (dict(T=0), "T"), (dict(T=10, W=-1), "W"), (dict(T=10, n=-2), "n"),
    (dict(T=10, reference=0), "reference"), (dict(T=10, scale=0), "scale"),
    (dict(T=10, scale=float("nan")), "scale"), (dict(T=10, kfi=0), "kfi"),
    (dict(T=2.5), "T")])
def test_bad_inputs(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_schedule(**kw)


# ------------------------------------------------------------- against the literal spec
@settings(max_examples=150, deadline=None)
@given(T=st.integers(1, 70), W=st.integers(0, 5), n=st.integers(0, 4), ref=st.integers(1, 40),
       scale=st.sampled_from([0.5, 0.8, 1.0, 1.3]), expand=st.booleans(),
       kfi=st.one_of(st.none(), st.integers(1, 20)))
def test_planner_matches_literal_spec(T, W, n, ref, scale, expand, kfi):
    s = plan_schedule(T, W, n, ref, scale, kfi=kfi, expand=expand)
    k = spec_kfi(T, W, n, ref, scale) if kfi is None else kfi
    assert s.key_frame_interval == k
    for o in range(min(k, 4)):
        m = s.mask(o)
        G = spec_globals(T, k, n, o)
        assert set(m.globals) == G
        for f in range(T):
            if W == 0:
                assert set(m.attended(f)) == G
                continue
            lo, hi = spec_window(T, W, G, f, expand)
            assert m.window(f) == (lo, hi)
            assert set(m.attended(f)) == G | set(range(lo, hi + 1))
            assert lo <= f <= hi
            if expand:
                non_global = sum(1 for x in range(lo, hi + 1) if x not in G)
                assert non_global == min(2 * W + 1, T - len(G))


def test_compute_kfi_public():
    assert compute_key_frame_interval(81, 3, 1, 21) == 6
    assert compute_key_frame_interval(21, 3, 1, 21) == 1


# -------------------------------------------------------------------------- geometry
def test_latent_frames_and_grid_errors():
    assert latent_frames(81) == 21 and latent_frames(129) == 33 and latent_frames(1) == 1
    with pytest.raises(ValueError, match=r"use 81 or 85"):
        latent_frames(83)


def test_patches_per_frame():
    assert patches_per_frame(480, 832, 8, 2) == 1560
    assert patches_per_frame(480, 832, 16, 1) == 1560
    assert patches_per_frame(704, 1280, 16, 2) == 880
    with pytest.raises(ValueError, match="divisible"):
        patches_per_frame(481, 832, 8, 2)


def test_presets():
    assert get_preset("wan").reference_latent_frames == 21
    assert get_preset("hunyuanvideo-1.5").reference_latent_frames == 33
    assert get_preset("cogvideox").reference_latent_frames == 13
    ti2v = get_preset("wan2.2-ti2v-5b")
    assert ti2v.reference_latent_frames == 31 and ti2v.patches_per_frame() == 880
    assert ti2v.default_latent_frames == 31
    for p in PRESETS.values():
        assert p.patches_per_frame() > 0
    assert get_preset("hunyuan").patches_per_frame() == 1560
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("sora")


def test_the_other_reading_contradicts_the_worked_values():
    T, W = 81, 3
    G = spec_globals(T, 6, 1, 0)
    att = 0
    for f in range(T):
        lo, hi = max(0, min(f - W, T - 1 - 2 * W)), min(T - 1, max(f + W, 2 * W))
        need = min(2 * W + 1, T - len(G))
        while sum(1 for x in range(lo, hi + 1) if x not in G) < need:
            lo, hi = max(lo - 1, 0), min(hi + 1, T - 1)
        att += len(G | set(range(lo, hi + 1)))
    assert round(1 - att / T / T, 3) == 0.735 != round(plan_schedule(T, W, 1, 21).mask(0).sparsity(), 3)


def test_huge_explicit_kfi_plans_at_most_T_patterns():
    s = plan_schedule(20, 2, 1, 8, kfi=100000)
    assert len(s.masks) == 20
    assert s.mask_for_step(100003).globals == (0, 3)  # offset 100003 % 100000 = 3
    assert s.mask_for_step(23).globals == (0, 3)
