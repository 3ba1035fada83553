"""The lvsa processors on the SPARSE path equal the original diffusers processors run with
the token-level block mask as an explicit attention mask (rotated step, batch 2, text)."""
import torch

from lvsa import integrations, tiny

STEP = 1


def token_mask(eng, T, P, Lt=0, text_first=False):
    bm = eng.schedule(T, P).mask_for_step(STEP)
    m = bm.to_dense("token", P)
    S = T * P + Lt
    full = torch.ones(S, S, dtype=torch.bool)
    if text_first:
        full[Lt:, Lt:] = m
    else:
        full[:T * P, :T * P] = m
    assert not bm.is_dense and bm.offset == STEP % bm.key_frame_interval
    return full


def _engine(tr, P, ref):
    integrations.enable(tr, patches_per_frame=P, reference_latent_frames=ref)
    eng = integrations.engine_of(tr)
    eng.set_step(STEP)
    return eng


def test_wan_sparse_equals_masked_original(fresh_plugins):
    torch.manual_seed(0)
    T, P = 25, 4
    tr = tiny.build("wan").transformer
    eng = _engine(tr, P, 21)
    attn = tr.blocks[0].attn1
    hs = torch.randn(2, T * P, 24)
    rot = tr.rope(torch.randn(2, 16, T, 4, 4))
    with torch.no_grad():
        got = attn.processor(attn, hs, None, None, rot)
        want = attn.processor.original(attn, hs, None, token_mask(eng, T, P), rot)
        dense = attn.processor.original(attn, hs, None, None, rot)
    assert (got - want).abs().max() < 1e-5
    assert (got - dense).abs().max() > 1e-3  # the mask matters


def test_cogvideox_sparse_equals_masked_original(fresh_plugins):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    torch.manual_seed(0)
    T, P, Lt = 25, 4, 7
    tr = tiny.build("cogvideox").transformer
    eng = _engine(tr, P, 13)
    attn = tr.transformer_blocks[0].attn1
    hs, enc = torch.randn(2, T * P, 32), torch.randn(2, Lt, 32)
    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (2, 2)), (2, 2), T, use_real=True)
    with torch.no_grad():
        got = attn.processor(attn, hs, enc, None, (cos, sin))
        m = token_mask(eng, T, P, Lt, text_first=True)
        want = attn.processor.original(attn, hs, enc, m.expand(2, -1, -1), (cos, sin))
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-5


def test_hunyuan_sparse_equals_masked_original_with_padded_text(fresh_plugins, monkeypatch):
    import diffusers.models.transformers.transformer_hunyuan_video15 as H
    torch.manual_seed(0)
    T, P, Lt = 37, 4, 9
    tr = tiny.build("hunyuan").transformer
    eng = _engine(tr, P, 33)
    attn = tr.transformer_blocks[0].attn
    hs, enc = torch.randn(2, T * P, 16), torch.randn(2, Lt, 16)
    txt = torch.zeros(2, Lt, dtype=torch.long)
    txt[0, :5] = 1
    txt[1, :3] = 1  # different valid prompt lengths in one batch
    rope = (torch.randn(T * P, 8), torch.randn(T * P, 8))
    m = token_mask(eng, T, P, Lt)
    with torch.no_grad():
        got = attn.processor(attn, hs, enc, txt, rope)
        orig = H.dispatch_attention_fn
        monkeypatch.setattr(H, "dispatch_attention_fn",
                            lambda q, k, v, attn_mask=None, **kw: orig(q, k, v, attn_mask=attn_mask & m, **kw))
        want = attn.processor.original(attn, hs, enc, txt, rope)
    assert (got[0] - want[0]).abs().max() < 1e-5
    tv = txt.bool()
    for b in range(2):
        assert (got[1][b, tv[b]] - want[1][b, tv[b]]).abs().max() < 1e-5
