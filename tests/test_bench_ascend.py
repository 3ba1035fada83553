"""benchmarks/bench_ascend.py runs end to end on the CPU emulation of torch_npu (tiny shapes)."""
import importlib.util
import json
import os

from ascend_emulation import installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ascend_on_the_emulation(tmp_path, fresh_plugins, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npu-smi here: recorded as a reason
    spec = importlib.util.spec_from_file_location("bench_ascend", os.path.join(ROOT, "benchmarks", "bench_ascend.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with installed(device_count=1):
        rows = bench.main(["--device", "cpu", "--dtype", "float16", "--shapes", "hy-t65-text", "wan1.3b-t81-b2",
                           "--frames", "9", "--heads", "2", "--reference", "3", "--tokens-per-frame", "6", "--head-dim", "16",
                           "--iters", "1", "--warmup", "0", "--out", str(tmp_path), "--tag", "emu"])
    assert [r["shape"] for r in rows] == ["hy-t65-text", "wan1.3b-t81-b2"]
    assert all(r["err_ascend_vs_reference"] < 5e-3 and r["density"] < 1 for r in rows)
    data = json.loads((tmp_path / "ascend-emu.json").read_text())
    assert "npu-smi not found" in data["meta"]["npu_smi_before"]
    assert "| hy-t65-text | 1 | 256 |" in (tmp_path / "ascend-emu.md").read_text()
