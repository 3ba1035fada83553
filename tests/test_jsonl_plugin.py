"""The lvsa-jsonl sink, loaded through its installed entry point."""
import json

import torch

from lvsa import plugins
from lvsa.engine import Engine


def test_jsonl_sink_writes_every_event(fresh_plugins, tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("LVSA_JSONL_PATH", str(path))
    rec = {r.name: r for r in plugins.plugin_records()}
    assert rec["jsonl"].status == "loaded" and rec["jsonl"].distribution == "lvsa-jsonl"
    eng = Engine(family="wan", window_size=4)
    eng.set_geometry(patches_per_frame=2)
    eng.begin_generation()
    q = torch.randn(1, 30 * 2, 2, 8)
    eng.attention(q, q, q)
    eng.attention(q[:, :7], q[:, :7], q[:, :7])  # foreign geometry
    events = [json.loads(x) for x in path.read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "generation_start"
    assert {"schedule", "engaged", "selection", "plan_built", "fallback"} <= set(kinds)
    fb = next(e for e in events if e["kind"] == "fallback")
    assert fb["reason"] == "geometry_detect" and fb["seq_len"] == 7 and fb["known_ppf"] == [2]
    eng_ev = next(e for e in events if e["kind"] == "engaged")
    assert eng_ev["T"] == 30 and eng_ev["dense"] is False


def test_jsonl_sink_off_without_path(fresh_plugins, tmp_path, monkeypatch):
    monkeypatch.delenv("LVSA_JSONL_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    from lvsa import telemetry
    telemetry.emit("warning", message="x")
    assert list(tmp_path.iterdir()) == []
