"""Hostile or mistaken input to the core gets a clear error, never a bare AttributeError or
a silently wrong answer; planning cost stays O(T) per mask and long T is refused up front."""
import tracemalloc

import pytest
import torch

import lvsa
from lvsa.backend import Problem
from lvsa.backends.reference import ReferenceBackend
from lvsa.errors import LVSAInputError, PlanTooLarge
from lvsa.schedule import MAX_LATENT_FRAMES, plan_schedule


def test_disable_of_something_never_enabled():
    with pytest.raises(TypeError, match=r"lvsa.disable\(\) takes the pipeline or transformer given "
                                        r"to lvsa.enable\(\), got object"):
        lvsa.disable(object())
    assert lvsa.integrations.engine_of(object()) is None
    assert lvsa.integrations.last_summary(3) is None

    class NotAPipe:
        pass

    p = NotAPipe()
    assert lvsa.disable(p) is p  # never enabled: a no-op, as documented


@pytest.mark.parametrize("bad", [None, "mask", 3, torch.zeros(2, 2, dtype=torch.bool)])
def test_attention_without_a_block_mask(bad):
    q = torch.randn(1, 12, 2, 8)
    with pytest.raises(LVSAInputError, match=r"mask must be a lvsa.BlockMask, got .*plan_schedule"):
        lvsa.attention(q, q, q, bad)


@pytest.mark.parametrize("frame", [-1, 9, 100, 1.0, True])
def test_mask_frames_outside_the_mask_are_refused(frame):
    m = plan_schedule(9, 1, 1, 3).mask(0)
    with pytest.raises(IndexError, match=r"outside this mask's frames \[0, 9\)"):
        m.window(frame)
    with pytest.raises(IndexError, match="outside"):
        m.attended(frame)
    assert m.window(8) == m.windows[8] and m.attended(0)[0] == 0


def test_head_dim_zero_is_no_problem_any_backend_runs():
    p = Problem("cpu", torch.float32, 1, 4, 1, 1, 0, T=2, P=2)
    assert any("head_dim is 0" in r for r in ReferenceBackend().not_supported_reasons(p))


# ------------------------------------------------------------- planning cost
def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_planning_memory_is_linear_in_T():
    """T=3000 latent frames: ~200 rotation patterns; only those a step asks for are built,
    each O(T) (before: all patterns, each with T rows, ~O(T^2))."""
    plan_schedule.cache_clear()

    def plan():
        s = plan_schedule(3000, 3, 1, 21)
        assert s.key_frame_interval > 100
        for step in range(3):
            m = s.mask_for_step(step)
            assert m.summary().attended_max <= 3000
    peak = _peak_bytes(plan)
    assert peak < 8 * 2**20, f"planning T=3000 peaked at {peak / 2**20:.1f} MiB"
    # and it grows linearly: 4x the frames, about 4x the memory (not 16x)
    plan_schedule.cache_clear()
    big = _peak_bytes(lambda: plan_schedule(12000, 3, 1, 21).mask_for_step(1).summary())
    plan_schedule.cache_clear()
    small = _peak_bytes(lambda: plan_schedule(3000, 3, 1, 21).mask_for_step(1).summary())
    assert big < 6 * small


def test_lazy_patterns_equal_the_eager_ones():
    s = plan_schedule(200, 2, 1, 13)
    all_masks = s.masks
    assert len(all_masks) == s.num_offsets == min(s.key_frame_interval, 200)
    for o in (0, 5, s.num_offsets - 1):
        m = s.mask(o)
        assert m == all_masks[o] and m.offset == o
        for f in (0, 77, 199):
            row = set(m.globals) | set(range(m.windows[f][0], m.windows[f][1] + 1))
            assert m.attended(f) == tuple(sorted(row)) and m.attended_count(f) == len(row)


def test_a_schedule_beyond_the_limit_is_refused_up_front():
    with pytest.raises(PlanTooLarge, match=rf"T={MAX_LATENT_FRAMES + 1} latent frames is beyond "
                                           rf"the longest schedule lvsa plans \({MAX_LATENT_FRAMES}"):
        plan_schedule(MAX_LATENT_FRAMES + 1, 3, 1, 21)
    with pytest.raises(ValueError):  # PlanTooLarge is a ValueError too
        plan_schedule(10**6, 3, 1, 21)
    eng = lvsa.Engine(family="wan", total_latent_frames=MAX_LATENT_FRAMES + 1)
    q = torch.randn(1, MAX_LATENT_FRAMES + 1, 1, 2)
    with pytest.raises(PlanTooLarge):
        eng.attention(q, q, q)
