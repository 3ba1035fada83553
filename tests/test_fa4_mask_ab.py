"""benchmarks/fa4_mask_ab.py (the device A/B of the fa4 mask_mod kinds) end to end on the
CPU stand-in of FA4, so a device call never fails on the script itself: the real kinds
match the reference, ``nomask`` (partial tiles run unmasked) does not, the files are written."""
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
    recs = ab.main(["--tag", "t", "--out", str(tmp_path), "--device", "cpu", "--iters", "1",
                    "--shapes", "quick-wan-t41", "quick-hy-t49-text"])
    for rec in recs:
        v = rec["variants"]
        assert set(v) == set(ab.VARIANTS) and not any("error" in r for r in v.values()), v
        assert v["table"]["kind"] == "table" and v["mulhi"]["kind"] == "mulhi"
        assert v["table"]["err_vs_reference"] < 1e-2 and v["mulhi"]["err_vs_reference"] < 1e-2
        assert v["nomask"]["err_vs_reference"] > 0.05     # partial tiles unmasked: wrong, as meant
        assert rec["mulhi_equals_table"] is True and rec["tiles"]["partial"] > 0
    assert "text_merge_bm64_ms" in recs[1]["text"] and "error" not in recs[1]["text"], recs[1]["text"]
    (j,) = tmp_path.glob("fa4-mask-ab-t-*.json")
    assert json.loads(j.read_text())["records"][0]["shape"] == "quick-wan-t41"
    assert "| quick-hy-t49-text |" in next(tmp_path.glob("*.md")).read_text()
