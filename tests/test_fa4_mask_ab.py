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
                    "--shapes", "quick-wan-t41", "quick-hy-t49-text", "--choice-file", str(tmp_path / "kind")])
    for rec in recs:
        v = rec["variants"]
        assert set(v) == set(ab.VARIANTS) and not any("error" in r for r in v.values()), v
        assert v["table"]["kind"] == "table" and v["mulhi"]["kind"] == "mulhi"
        assert v["table"]["err_vs_reference"] < 1e-2 and v["mulhi"]["err_vs_reference"] < 1e-2
        assert v["nomask"]["err_vs_reference"] > 0.05     # partial tiles unmasked: wrong, as meant
        assert rec["mulhi_equals_table"] is True and rec["tiles"]["partial"] > 0
    assert "text_merge_bm64_ms" in recs[1]["text"] and "error" not in recs[1]["text"], recs[1]["text"]
    assert (tmp_path / "kind").read_text() == ab.choose(recs) in ("table", "mulhi")
    (j,) = tmp_path.glob("fa4-mask-ab-t-*.json")
    assert json.loads(j.read_text())["records"][0]["shape"] == "quick-wan-t41"
    assert "| quick-hy-t49-text |" in next(tmp_path.glob("*.md")).read_text()


def test_choice_needs_mulhi_exact_and_faster():
    ab = _script()
    rec = lambda eq, sp: {"mulhi_equals_table": eq, "variants": {"mulhi": {"speed_vs_table": sp}}}  # noqa: E731
    assert ab.choose([rec(True, 1.03), rec(True, 1.01)]) == "mulhi"
    assert ab.choose([rec(True, 1.03), rec(False, 1.05)]) == "table"     # an output differs
    assert ab.choose([rec(True, 1.05), rec(True, 0.98)]) == "table"      # one shape 2 % slower
    assert ab.choose([rec(True, 0.995), rec(True, 1.0)]) == "table"
    assert ab.choose([rec(True, 1.02), {"variants": {"mulhi": {"error": "x"}}}]) == "table"
