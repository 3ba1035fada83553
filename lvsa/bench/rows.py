"""Rows of the benchmark tables: one row's summary and the merge of several results files.

A model row is ``(model, T_lat, batch, world size)`` (and the video size, so that a run at
another resolution is another row); an attention row is a shape. Several results files
(each measuring the rows the others lack, or re-measuring some) merge into one table:

* files are taken oldest first (``meta.date``; the path breaks a tie), so the merge does
  not depend on the order they are given in;
* a row measured in several files takes each variant (``diffusers``, ``dense``, a backend)
  from the newest file that has it: a newer file overrides the variants it measured and
  keeps the older file's others (a run with ``--baselines dense`` keeps an older file's
  ``diffusers`` time);
* the derived figures (speedups, the ceiling, the best backend) are recomputed from the
  merged variants by :func:`summarize_row`, never copied.

Each merged record carries where its figures came from (``_from``: variant -> source
index; ``_single_from``: 1-GPU variant -> origin; ``_err_from``: attention backend -> the
older file whose check against the reference its error is, when the newest file that
timed it ran no reference) for the report's footnotes; these keys are never written to a
results file.
"""
from __future__ import annotations

import copy
import os
import shlex
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import common

#: the dense baselines of ``lvsa bench model``: diffusers' own attention, and lvsa's
#: processor at full density on the fastest dense kernel (the *best dense*)
BASELINES = ("diffusers", "dense")

#: per-variant figures that :func:`summarize_row` derives (cleared before recomputing)
_DERIVED_VARIANT = ("speedup_vs_dense", "speedup_vs_diffusers", "of_ceiling", "memory_vs_dense",
                    "speedup_vs_1gpu", "parallel_efficiency")
#: record fields a newer file does not simply overwrite (merged, or derived)
_MERGED_FIELDS = ("variants", "single_gpu", "single_gpu_from", "refused", "dense_kernel", "dense_kernels_ms",
                  "ceiling_s", "ceiling_speedup", "dense_attention_share", "best_backend", "dense_oom_lvsa_not",
                  "dense_baseline", "results", "ideal_ms", "ideal_from", "ratios")
#: the 1-GPU origin of a record written before ``single_gpu_from`` existed
RANK0 = "rank 0"


# ------------------------------------------------------------------- one row
def dense_baseline(variants: Dict[str, Any]) -> Optional[str]:
    """The baseline that speed claims and the ceiling of a row use: the best dense
    (``dense``) whenever the row has it (measured, or failed: an OOM stays an OOM);
    diffusers' own attention only when ``dense`` was not run (``--baselines diffusers``
    and no merged file has it)."""
    for name in ("dense", "diffusers"):
        if name in variants:
            return name
    return None


def summarize_row(rec: Dict[str, Any]) -> None:
    """Speedups, the ceiling and memory ratios of one model row (in place).

    ``ceiling = rest + dense attention x density`` from the row's dense baseline
    (:func:`dense_baseline`); each lvsa backend's ``speedup_vs_dense`` is against that
    baseline (``rec["dense_baseline"]`` names it), ``speedup_vs_diffusers`` against
    diffusers' own, ``speedup_vs_1gpu`` against ``rec["single_gpu"]``'s time of the same
    backend."""
    V = rec["variants"]
    base = dense_baseline(V)
    rec["dense_baseline"] = base
    dense = V.get(base, {}) if base else {}
    diff = V.get("diffusers", {})
    d_t = dense.get("time_s")
    rec.pop("dense_attention_share", None)
    rec.pop("ceiling_speedup", None)
    rec["ceiling_s"] = None
    if d_t and dense.get("attention_time_s") is not None:
        rest = dense.get("rest_time_s", d_t - dense["attention_time_s"])
        rec["dense_attention_share"] = dense["attention_time_s"] / d_t
        rec["ceiling_s"] = rest + dense["attention_time_s"] * rec["density"]
        rec["ceiling_speedup"] = d_t / rec["ceiling_s"]
    for name, r in V.items():
        if name in BASELINES:
            continue
        for k in _DERIVED_VARIANT:
            r.pop(k, None)
        if not r.get("time_s"):
            continue
        t = r["time_s"]
        if d_t:
            r["speedup_vs_dense"] = d_t / t
        if diff.get("time_s"):
            r["speedup_vs_diffusers"] = diff["time_s"] / t
        if rec["ceiling_s"]:
            r["of_ceiling"] = rec["ceiling_s"] / t
        if dense.get("peak_alloc_gib") and r.get("peak_alloc_gib"):
            r["memory_vs_dense"] = r["peak_alloc_gib"] / dense["peak_alloc_gib"]
        one = (rec.get("single_gpu") or {}).get(name)
        if one:
            r["speedup_vs_1gpu"] = one / t
            r["parallel_efficiency"] = r["speedup_vs_1gpu"] / rec["world_size"]
    best = [(r["time_s"], n) for n, r in V.items() if n not in BASELINES and r.get("time_s")]
    rec["best_backend"] = min(best)[1] if best else None
    rec["dense_oom_lvsa_not"] = [n for n, r in V.items() if n not in BASELINES and r.get("time_s")
                                 and any(V.get(b, {}).get("error") == "OOM" for b in BASELINES)]


# ----------------------------------------------------------------- sources
class Source:
    """One results file: its data, where it is, when it was measured."""

    def __init__(self, path: str, data: Dict[str, Any]):
        self.path = path
        self.data = data
        self.meta = data["meta"]
        self.records = data["records"]
        self.index = 0  # 1-based after :func:`load_sources`

    @property
    def rel(self) -> str:
        return self.path if not os.path.isabs(self.path) else os.path.relpath(self.path)

    @property
    def date(self) -> str:
        return str(self.meta.get("date") or "")

    @property
    def kind(self) -> str:
        return results_kind(self.data)

    @property
    def world_size(self) -> int:
        return int(self.meta.get("world_size") or 1)

    def single_gpu_origin(self) -> str:
        """Where a record of this file that predates ``single_gpu_from`` took its 1-GPU
        times: the run's ``--single-gpu-results`` (where that file had the row) or rank 0."""
        files = option_values(self.meta.get("command", ""), "--single-gpu-results")
        if not files:
            return RANK0
        return " or ".join(f"`{f}`" for f in files) + f" where it had the row, else {RANK0} alone"


def results_kind(data: Dict[str, Any]) -> str:
    """``model`` or ``attention`` (from the records; an empty file counts as a model run
    when its command says so)."""
    recs = data.get("records") or []
    if recs:
        return "model" if "variants" in recs[0] else "attention"
    return "attention" if "bench attention" in str(data.get("meta", {}).get("command", "")) else "model"


def option_values(command: str, option: str) -> List[str]:
    """The values given to ``option`` in a recorded command line (``[]``: not given)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    out: List[str] = []
    for i, w in enumerate(words):
        if w == option:
            for v in words[i + 1:]:
                if v.startswith("--"):
                    break
                out.append(v)
        elif w.startswith(option + "="):
            out.append(w.split("=", 1)[1])
    return out


def load_sources(paths: Sequence[str], option: str = "lvsa bench report") -> List[Source]:
    """The results files ``paths``, oldest first (``meta.date``, then the path), numbered
    from 1; a file given twice counts once."""
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            continue
        seen.add(real)
        out.append(Source(p, common.load_results(p, option)))
    out.sort(key=lambda s: (s.date, s.rel))
    for i, s in enumerate(out, 1):
        s.index = i
    _same_machine(out, option)
    return out


def machine(data: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """``(accelerator name, dtype)`` a results file was measured with (``None`` where an
    older file does not say)."""
    meta = data.get("meta") or {}
    dev = meta.get("device_before") if isinstance(meta.get("device_before"), dict) else {}
    name = None
    gpus = dev.get("gpus")
    if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict):
        name = gpus[0].get("name")
    if not name and isinstance(meta.get("device"), dict):
        name = meta["device"].get("name")
    if not name:
        name = dev.get("name") or dev.get("npu_name") or (dev.get("cpu") if dev.get("kind") == "cpu" else None)
    return (str(name) if name else None), meta.get("dtype")


def _same_machine(sources: Sequence["Source"], option: str) -> None:
    """Files merged into one table must come from one kind of accelerator and one dtype:
    a row's ratios are computed across its files (an H100 dense time against an H200 lvsa
    time would be a silent wrong answer)."""
    seen: Dict[int, Dict[str, List[str]]] = {0: {}, 1: {}}
    for s in sources:
        for i, v in enumerate(machine(s.data)):
            if v:
                seen[i].setdefault(v, []).append(s.rel)
    for i, what in ((0, "devices"), (1, "dtypes")):
        if len(seen[i]) > 1:
            listed = "; ".join(f"{v}: {', '.join(files)}" for v, files in seen[i].items())
            raise ValueError(f"{option}: the files were measured on different {what} ({listed}); "
                             "report each in its own run (a merged row would compare times across them)")


# ------------------------------------------------------------------ merging
def row_key(rec: Dict[str, Any]) -> Tuple:
    """What makes two records the same row."""
    if "variants" not in rec:
        return ("attention", rec["shape"])
    return (rec["model"], rec["T"], rec["batch"], int(rec.get("world_size") or 1), rec.get("height"),
            rec.get("width"))


def _insert_at(order: List[Tuple], key: Tuple) -> int:
    """Where a row first seen in a later file goes: after the last row of the same model
    and T_lat (a new batch), else after the model's last row, else at the end."""
    if key[0] == "attention":
        return len(order)
    same = ([i for i, k in enumerate(order) if k[:2] == key[:2] and k[3:] == key[3:]]
            or [i for i, k in enumerate(order) if k[0] == key[0] and k[3:] == key[3:]]
            or [i for i, k in enumerate(order) if k[0] == key[0]])
    return same[-1] + 1 if same else len(order)


def merge(sources: Sequence[Source]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The merged records of ``sources`` (oldest first, as :func:`load_sources` orders
    them) and notes on what did not agree. Rows keep the first file's order; a row new in
    a later file joins its model's rows. Model rows are re-summarized."""
    rows: Dict[Tuple, Dict[str, Any]] = {}
    order: List[Tuple] = []
    notes: List[str] = []
    for n, s in enumerate(sources):
        for rec in s.records:
            key = row_key(rec)
            m = rows.get(key)
            if m is None:
                m = {k: copy.deepcopy(v) for k, v in rec.items() if k not in _MERGED_FIELDS}
                m.update(_from={}, _single_from={}, refused={})
                m["variants" if "variants" in rec else "results"] = {}
                rows[key] = m
                order.insert(len(order) if n == 0 else _insert_at(order, key), key)
            else:
                for geo in ("density", "kfi", "tokens"):
                    if geo in rec and geo in m and rec[geo] != m[geo]:
                        notes.append(f"{_row_name(m)}: {geo} {m[geo]} in an older file, {rec[geo]} in "
                                     f"[{s.index}] (the newer is used)")
                m.update({k: copy.deepcopy(v) for k, v in rec.items() if k not in _MERGED_FIELDS})
            _merge_variants(m, rec, s)
    out = [rows[k] for k in order]
    for m in out:
        present = m.get("variants") or m.get("results") or {}
        m["refused"] = {k: v for k, v in m["refused"].items() if k not in present}
        if "variants" in m:
            summarize_row(m)
        else:
            from .attention import set_ideal

            set_ideal(m)
    return out, notes


def _merge_variants(m: Dict[str, Any], rec: Dict[str, Any], s: Source) -> None:
    field = "variants" if "variants" in rec else "results"
    for name, r in rec[field].items():
        old = m[field].get(name, {})
        m[field][name] = copy.deepcopy(r)
        if "rel_err" in old and "rel_err" not in r and r.get("ms"):
            # an attention run without the reference checked nothing: the older check of the
            # same backend at the same shape stands (``_err_from`` names its file)
            m[field][name]["rel_err"] = old["rel_err"]
            m[field][name].pop("unchecked", None)
            m.setdefault("_err_from", {})[name] = m.get("_err_from", {}).get(name, m["_from"][name])
        else:
            m.get("_err_from", {}).pop(name, None)
        m["_from"][name] = s.index
        if name == "dense" and "dense_kernel" in rec:
            m["dense_kernel"], m["dense_kernels_ms"] = rec["dense_kernel"], rec.get("dense_kernels_ms")
    m["refused"].update(copy.deepcopy(rec.get("refused") or {}))
    if rec.get("single_gpu"):
        m.setdefault("single_gpu", {})
        origin = rec.get("single_gpu_from") or {}
        for name, t in rec["single_gpu"].items():
            m["single_gpu"][name] = t
            m["_single_from"][name] = (s.index, origin.get(name) or s.single_gpu_origin())


def single_gpu_key(rec: Dict[str, Any]) -> Tuple:
    """A row's key without its world size: the 1-GPU row it compares with."""
    k = row_key(rec)
    return k[:3] + k[4:]


def single_gpu_rows(sources: Sequence[Source], option: str = "--single-gpu-results"
                    ) -> Dict[Tuple, Dict[str, Tuple[float, Source]]]:
    """The 1-GPU time of every measured variant of the 1-GPU rows of ``sources``, merged
    (the newest file that measured a variant wins): ``{single_gpu_key: {variant: (s, file)}}``."""
    out: Dict[Tuple, Dict[str, Tuple[float, Source]]] = {}
    for s in sources:
        if s.kind != "model":
            raise ValueError(f"{option} {s.rel}: an attention results file; give `lvsa bench model` results")
        ones = [r for r in s.records if int(r.get("world_size") or 1) == 1]
        if s.records and not ones:
            raise ValueError(f"{option} {s.rel}: no 1-GPU rows (a --world-size {s.world_size} run); "
                             "give the results of a run on one GPU")
        for rec in ones:
            row = out.setdefault(single_gpu_key(rec), {})
            for name, r in rec["variants"].items():
                if r.get("time_s"):
                    row[name] = (r["time_s"], s)
    return out


def fill_single_gpu(records: Sequence[Dict[str, Any]], ones: Dict[Tuple, Dict[str, Tuple[float, Source]]]) -> None:
    """Give each multi-GPU record the 1-GPU times it lacks from ``ones`` (what the record
    measured itself stays) and re-summarize it."""
    for rec in records:
        have = rec.setdefault("single_gpu", {})
        for name, (t, s) in ones.get(single_gpu_key(rec), {}).items():
            if name not in have:
                have[name] = t
                rec.setdefault("_single_from", {})[name] = (s.index, s.rel)
        summarize_row(rec)


def _row_name(rec: Dict[str, Any]) -> str:
    if "variants" not in rec:
        return rec.get("shape", "?")
    w = int(rec.get("world_size") or 1)
    return f"{rec.get('title', rec.get('model'))} T{rec['T']} B{rec['batch']}" + (f" on {w} GPUs" if w > 1 else "")


def skipped_still_missing(sources: Sequence[Source], records: Sequence[Dict[str, Any]]) -> List[str]:
    """The time-budget skips of ``sources`` whose row no merged file measured."""
    have = {(r["model"], r["T"], r["batch"], int(r.get("world_size") or 1)) for r in records if "variants" in r}
    have_shape = {r.get("shape") for r in records}
    out: List[str] = []
    for s in sources:
        for text in s.meta.get("skipped") or []:
            words = text.split()
            try:
                key = (words[0], int(words[1][1:]), int(words[2][1:]), s.world_size)
            except (IndexError, ValueError):
                key = None
            if key in have or words[:1] and words[0] in have_shape:
                continue
            if text not in out:
                out.append(text)
    return out
