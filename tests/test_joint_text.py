"""``lvsa.integrations.joint.video_attention_with_text``: the one implementation of the video
queries' attention over video keys (sparse) and valid text keys (dense) that the diffusers
HunyuanVideo 1.5 processor and the vllm-omni plugin share."""
import pytest
import torch

import lvsa
from lvsa.engine import Engine
from lvsa.integrations.joint import video_attention_with_text

T, P, L, B, H, D = 12, 4, 6, 3, 2, 8
SCALE = D ** -0.5


class Counting(Engine):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def attention(self, q, k, v, text_k=None, text_v=None, **kw):
        self.calls.append((q.shape[0], None if text_k is None else text_k.shape[1]))
        return super().attention(q, k, v, text_k=text_k, text_v=text_v, **kw)


@pytest.fixture
def setup(fresh_plugins):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T * P, H, D, generator=g) for _ in range(3))
    tk, tv = (torch.randn(B, L, H, D, generator=g) for _ in range(2))
    eng = Counting(family="wan", reference_latent_frames=4)
    eng.set_geometry(patches_per_frame=P, latent_frames=T)
    mask = eng.schedule(T, P).mask_for_step(0)
    assert not mask.is_dense
    return eng, mask, q, k, v, tk, tv


def _expected(mask, q, k, v, tk, tv, valid):
    outs = []
    for b in range(B):
        sel = valid[b]
        kb, vb = (tk[b:b + 1, sel], tv[b:b + 1, sel]) if bool(sel.any()) else (None, None)
        outs.append(lvsa.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask, scale=SCALE, text_k=kb, text_v=vb))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths, calls", [
    ((6, 6, 6), [(B, L)]),                   # no padding: one call, every text key
    ((4, 4, 4), [(B, 4)]),                   # the same padding in every sample: one call
    ((0, 0, 0), [(B, None)]),                # no valid text key: video only
    ((6, 2, 0), [(1, 6), (1, 2), (1, None)]),  # prompts of different lengths: one call per sample
])
def test_valid_text_keys_and_calls(setup, lengths, calls):
    eng, mask, q, k, v, tk, tv = setup
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, :n] = True
    out = video_attention_with_text(eng, q, k, v, tk, tv, valid, scale=SCALE)
    assert eng.calls == calls
    torch.testing.assert_close(out, _expected(mask, q, k, v, tk, tv, valid), rtol=1e-5, atol=1e-5)


def test_without_a_mask_every_text_key_counts(setup):
    eng, mask, q, k, v, tk, tv = setup
    out = video_attention_with_text(eng, q, k, v, tk, tv, None, scale=SCALE)
    assert eng.calls == [(B, L)]
    torch.testing.assert_close(out, lvsa.attention(q, k, v, mask, scale=SCALE, text_k=tk, text_v=tv),
                               rtol=1e-5, atol=1e-5)
