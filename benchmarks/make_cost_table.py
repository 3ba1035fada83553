"""Derive lvsa's per-device cost table (``lvsa/data/costs-<device>.json``) from committed
benchmark results.

Each row is one shape class (:func:`lvsa.costs.shape_class`: mask density bucket, heads
bucket, head dim, text or not) with, per backend, its attention time relative to dense
cuDNN attention of the same shape (the median over every measured shape of the class;
lower is faster; a shape measured in several files counts once per backend, from the newest
file by the run's date in its ``meta``). Sources, best first:

* ``lvsa bench attention`` results (``attention-*.json``): kernel times of every backend
  and of dense cuDNN at the same shape;
* ``lvsa bench model`` results (``model-*.json``, one GPU): per-forward attention time of
  each backend variant over the ``dense`` variant's, for the classes the attention
  results do not cover.

The shipped H200 table (its ``sources`` list names the files: the final attention run, the
runs with fa4 up to the newest ten-shape run with its ``div`` mask_mod (div14b; it re-measured
every backend at every shape of div14, so that one would add nothing) and fa4's full-mask run
(t21), and the one-GPU model runs with a dense baseline; the earlier tuning runs,
call1/call2/full/flex/verify, are left out: the final run re-measured their shapes):

    python benchmarks/make_cost_table.py benchmarks/results/attention-h200-{final,fa4,rows,div14b,t21}-2*.json \
        benchmarks/results/model-h200-{final,verify2-cogvideox,rows,rows14b}-*.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lvsa.costs import TABLE_FORMAT, shape_class  # noqa: E402

#: benchmark result keys that are not lvsa backends
NOT_BACKENDS = ("dense_cudnn", "dense_fa2")


def from_attention(doc):
    for r in doc["records"]:
        dense = r["results"].get("dense_cudnn", {}).get("ms")
        if not dense:
            continue
        cls = shape_class(r["heads"], r["D"], r.get("text", 0), r["density"])
        for name, res in r["results"].items():
            if name in NOT_BACKENDS or "[" in name or "ms" not in res:  # "triton[cfg]": a sweep
                continue
            yield cls, name, res["ms"] / dense, f"{r['shape']} B{r['batch']}"


def from_model(doc):
    for r in doc["records"]:
        if r.get("dense_by_design") or r.get("world_size", 1) != 1:
            continue
        dense = r["variants"].get("dense", {}).get("attention_time_s")
        if not dense:
            continue
        cls = shape_class(r["heads"], r["head_dim"], r.get("text_tokens", 0), r["mask_density"])
        for name, v in r["variants"].items():
            if name in ("dense", "diffusers") or "attention_time_s" not in v:
                continue
            yield cls, name, v["attention_time_s"] / dense, f"{r['model']} T{r['T']} B{r['batch']} (model)"


def build(paths):
    device = None
    per_kind = {"attention": defaultdict(lambda: defaultdict(list)),
                "model": defaultdict(lambda: defaultdict(list))}
    shapes = defaultdict(set)
    #: (kind, shape, backend) -> (class key, relative time): a shape measured in several files
    #: counts once per backend, from the newest file (by the run's date)
    newest = {}
    docs = [(p, json.loads(Path(p).read_text())) for p in paths]
    # oldest first by the run's date (files without one first, in the order given): newer files win
    docs.sort(key=lambda pd: pd[1]["meta"].get("date") or "")
    for p, doc in docs:
        dev = doc["meta"]["device"]
        if isinstance(dev, dict):  # lvsa bench attention
            name = dev.get("name") or dev.get("torch_device")
        else:  # lvsa bench model: "cuda:0", the name under device_before
            name = doc["meta"].get("device_before", {}).get("torch_device", {}).get("name")
        name = name or _name_from(doc)
        if device is None:
            device = name
        elif name != device:
            raise SystemExit(f"{p}: device {name!r}, expected {device!r} (one table per device)")
        kind = "model" if "variants" in doc["records"][0] else "attention"
        rows = from_model(doc) if kind == "model" else from_attention(doc)
        for cls, backend, rel, shape in rows:
            newest[(kind, shape, backend)] = (cls.key, rel)
    for (kind, shape, backend), (key, rel) in newest.items():
        per_kind[kind][key][backend].append(rel)
        shapes[(kind, key)].add(shape)
    rows = {}
    for kind in ("attention", "model"):  # attention kernels first; model rows only fill gaps
        for key, by_backend in per_kind[kind].items():
            if key in rows:
                continue
            rows[key] = {"costs": {b: round(statistics.median(v), 4) for b, v in sorted(by_backend.items())},
                         "from": kind, "shapes": sorted(shapes[(kind, key)])}
    return {"format": TABLE_FORMAT, "device": device,
            "unit": "attention time / dense cuDNN attention time, same shape (lower is faster)",
            "sources": [_shown(p) for p in paths],
            "rows": dict(sorted(rows.items()))}


def _shown(path) -> str:
    """A source as the table lists it: relative to the repository when inside it."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def _name_from(doc):
    m = re.search(r"NVIDIA [A-Z0-9]+", json.dumps(doc["meta"]))
    return m.group(0) if m else "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", help="default: lvsa/data/costs-<device>.json")
    a = ap.parse_args(argv)
    table = build(a.results)
    slug = re.sub(r"[^a-z0-9]+", "-", table["device"].lower()).strip("-")
    out = Path(a.out or ROOT / "lvsa" / "data" / f"costs-{slug}.json")
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out} ({len(table['rows'])} shape classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
