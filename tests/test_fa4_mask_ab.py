"""benchmarks/fa4_mask_ab.py (the device A/B of the fa4 mask_mod kinds) end to end on the
CPU stand-in of FA4, so a device call never fails on the script itself: the two real
mask_mods (the backend's and the multiply-high candidate) match the reference, ``nomask`` (partial tiles run unmasked) does not, the files are written."""
import importlib.util
import json
import os

import torch

from fa4_standin import fake_fa4  # noqa: F401 - fixture

HERE = os.path.dirname(__file__)


def _script():
    spec = importlib.util.spec_from_file_location("fa4_mask_ab", os.path.join(HERE, "..", "benchmarks", "fa4_mask_ab.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_script_on_the_standin(fake_fa4, tmp_path, monkeypatch):
    ab = _script()
    monkeypatch.setattr(ab, "true_mask_mod", lambda: lambda rows, cols, aux: torch.ones(len(rows), len(cols), dtype=torch.bool))
    monkeypatch.setattr(ab, "mulhi_mask_mod", lambda: ab.mulhi_torch)
    recs = ab.main(["--tag", "t", "--out", str(tmp_path), "--device", "cpu", "--iters", "1",
                    "--shapes", "quick-wan-t41", "quick-hy-t49-text"])
    for rec in recs:
        v = rec["variants"]
        assert set(v) == set(ab.VARIANTS) and not any("error" in r for r in v.values()), v
        assert v["table"]["err_vs_reference"] < 1e-2 and v["mulhi"]["err_vs_reference"] < 1e-2
        assert v["nomask"]["err_vs_reference"] > 0.05     # partial tiles unmasked: wrong, as meant
        assert rec["mulhi_equals_table"] is True and rec["tiles"]["partial"] > 0
    assert "text_merge_64_64_8_2_ms" in recs[1]["text"] and "error" not in recs[1]["text"], recs[1]["text"]
    (j,) = tmp_path.glob("fa4-mask-ab-t-*.json")
    assert json.loads(j.read_text())["records"][0]["shape"] == "quick-wan-t41"
    assert "| quick-hy-t49-text |" in next(tmp_path.glob("*.md")).read_text()



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
