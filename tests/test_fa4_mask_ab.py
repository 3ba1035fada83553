"""benchmarks/fa4_mask_ab.py (the device A/B of the fa4 mask_mod kinds) end to end on the
CPU stand-in of FA4, so a device call never fails on the script itself: the two real
mask_mods (``table``, the backend's ``div``, the candidates ``divs`` and multiply-high) match the
reference and each other, ``nomask`` (partial tiles run unmasked) does not; the text pass's
``joint`` tables (text keys as FA4 key tiles) and ``per_batch`` give the reference; the files
are written."""
import dataclasses
import importlib.util
import json
import os

import torch

from fa4_standin import fake_fa4  # noqa: F401 - fixture
from test_fa4_backend import _expand

HERE = os.path.dirname(__file__)


def _script():
    spec = importlib.util.spec_from_file_location("fa4_mask_ab", os.path.join(HERE, "..", "benchmarks", "fa4_mask_ab.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_script_on_the_standin(fake_fa4, tmp_path, monkeypatch):
    from lvsa.bench.attention import SHAPE_BY_NAME
    from lvsa_cuda import fa4_backend as fa

    ab = _script()
    monkeypatch.setattr(ab, "true_mask_mod", lambda: lambda rows, cols, aux: torch.ones(len(rows), len(cols), dtype=torch.bool))
    monkeypatch.setattr(ab, "mulhi_mask_mod", lambda: ab.mulhi_torch)
    monkeypatch.setattr(ab, "divs_mask_mod", lambda P, r: fa.torch_mask_mod("div", P, r))
    monkeypatch.setitem(SHAPE_BY_NAME, "quick-hy-t49-text-b2",
                        dataclasses.replace(SHAPE_BY_NAME["quick-hy-t49-text"], name="quick-hy-t49-text-b2", batch=2))
    recs = ab.main(["--tag", "t", "--out", str(tmp_path), "--device", "cpu", "--iters", "1",
                    "--variants", *ab.ALL_VARIANTS,
                    "--shapes", "quick-wan-t41", "quick-hy-t49-text", "quick-hy-t49-text-b2"])
    for rec in recs:
        v = rec["variants"]
        assert set(v) == set(ab.ALL_VARIANTS) and not any("error" in r for r in v.values()), v
        for kind in ab.REAL:
            assert v[kind]["err_vs_reference"] < 1e-2, kind
        assert v["nomask"]["err_vs_reference"] > 0.05     # partial tiles unmasked: wrong, as meant
        assert rec["equals_table"] == {"div": True, "divs": True, "mulhi": True} and rec["tiles"]["partial"] > 0
    for rec in recs[1:]:
        text = rec["text"]
        assert "error" not in text and "text_merge_64_64_8_2_ms" in text, text
        for key in ("fa4_with_text_div_err", "fa4_with_text_table_err", "joint_err"):
            assert text[key] < 1e-2, (key, text)
    assert "per_batch_err" not in recs[1]["text"] and recs[2]["text"]["per_batch_err"] < 1e-2
    (j,) = tmp_path.glob("fa4-mask-ab-cpu-t-*.json")
    doc = json.loads(j.read_text())
    assert doc["records"][0]["shape"] == "quick-wan-t41"
    assert doc["meta"]["code"]["backend_variants"]["fa4"] == "mask_mod=div"     # lvsa bench's record
    assert "flash-attn-4" in doc["meta"]["versions"]
    assert "| quick-hy-t49-text |" in next(tmp_path.glob("*.md")).read_text()


def test_joint_tables_put_every_text_key_in_every_query_tile():
    """``joint_tables``: the text keys after the video as key tiles, all attended; the video
    part of every tile as the backend's tables have it (token picture against the mask)."""
    from lvsa.schedule import plan_schedule
    from lvsa_cuda import fa4_backend as fa

    ab = _script()
    for T, P, L, tile in ((7, 12, 5, (8, 8)), (6, 16, 16, (16, 8)), (5, 10, 23, (8, 16))):
        mask = plan_schedule(T, W=1, n=1, reference=3).mask(1)
        S = T * P
        t = fa.tile_tables(mask, P, None, tile)
        mask_cnt, mask_idx, full_cnt, full_idx, allowed = ab.joint_tables(t, S, L)
        joint = dataclasses.replace(t, mask_cnt=mask_cnt, mask_idx=mask_idx, full_cnt=full_cnt,
                                    full_idx=full_idx, allowed_div=allowed)
        want = torch.cat([mask.to_dense("token", tokens_per_frame=P), torch.ones(S, L, dtype=torch.bool)], 1)
        assert torch.equal(_expand(joint, S, S + L, "div"), want)



def test_mulhi_is_floor_division_wherever_it_is_called_exact():
    """The candidate's multiply-high is ``n // P`` for every key index ``mulhi_exact`` admits
    (all up to 2^22, the last 2^20, every multiple of P and one below), and not past it."""
    ab = _script()
    for P in (3, 5, 12, 33, 1350, 1560, 3600, 65535, 2 ** 20 + 7):
        keys = 2 ** 32 // P
        assert ab.mulhi_exact(P, keys) and not ab.mulhi_exact(P, keys + P)
        m = -(-2 ** 32 // P)
        assert 0 < m < 2 ** 31
        top = torch.arange(max(keys - 2 ** 20, 0), keys, dtype=torch.int64)
        mult = torch.arange(1, keys // P + 1, max(1, keys // P // 2 ** 20), dtype=torch.int64) * P
        for n in (torch.arange(min(keys, 2 ** 22), dtype=torch.int64), top, mult, mult - 1):
            assert torch.equal((n * m) >> 32, n // P)
    assert not ab.mulhi_exact(2, 10)


def test_nomask_lists_every_run_tile_as_full_ascending():
    """``as_full`` (the ``nomask`` bound): per query tile, the full and partial tiles of the
    backend's tables together, ascending like the backend's lists, none left to the mask_mod."""
    from lvsa.schedule import plan_schedule
    from lvsa_cuda import fa4_backend as fa

    ab = _script()
    t = fa.tile_tables(plan_schedule(9, W=1, n=1, reference=3).mask(1), 13, None, (16, 8))
    mask_cnt, _, full_cnt, full_idx = ab.as_full(t)
    assert int(mask_cnt.sum()) == 0 and int(t.mask_cnt.sum()) > 0
    for m in range(full_cnt.shape[-1]):
        got = full_idx[0, 0, m, :int(full_cnt[0, 0, m])].tolist()
        want = (t.full_idx[0, 0, m, :int(t.full_cnt[0, 0, m])].tolist()
                + t.mask_idx[0, 0, m, :int(t.mask_cnt[0, 0, m])].tolist())
        assert got == sorted(want)
