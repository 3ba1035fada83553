"""``lvsa bench``: ``attention`` (one call per backend), ``model`` (a whole transformer
forward, dense vs lvsa) and ``report`` (the README's performance section from a results
file). The code lives in :mod:`lvsa.bench`; it is imported when a subcommand runs."""
from __future__ import annotations

import argparse
import os


def _out_default() -> str:
    return os.environ.get("OUT") or "benchmarks/results"


def register(sub):
    p = sub.add_parser(
        "bench", help="benchmark attention or a whole transformer step on this machine (dense vs lvsa)",
        description=("Benchmarks with the device's state recorded (NVML/nvidia-smi, npu-smi, CPU). "
                     "Results: JSON (raw samples, environment, exact command), Markdown, PNG plots."))
    bs = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bs.required = True
    _add_attention(bs)
    _add_model(bs)
    _add_report(bs)


def _common(p, warmup: int, repeats: int, iters_alias: bool = False):
    o = p.add_argument_group("output")
    o.add_argument("--out", default=_out_default(), help="results folder (default: $OUT or benchmarks/results)")
    o.add_argument("--tag", default="", help="added to the results' file names")
    o.add_argument("--compare", metavar="OLD.json", help="print new/old time per row against an earlier results file")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("run")
    r.add_argument("--quick", action="store_true", help="tiny shapes: finishes in under a minute on a CPU")
    r.add_argument("--device", help="cuda, cuda:1, npu:0, cpu (default: the first accelerator)")
    r.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on accelerators, float32 on the CPU")
    r.add_argument("--backends", nargs="*", help="lvsa backends to time (default: every one that can run)")
    r.add_argument("--warmup", type=int, default=warmup, help="warm-up calls")
    r.add_argument("--repeats", *(["--iters"] if iters_alias else []), type=int, default=repeats,
                   help="timed calls (median reported)")
    r.add_argument("--seed", type=int, default=0)


def _add_attention(bs):
    p = bs.add_parser("attention", help="one attention call per backend at preset shapes vs dense SDPA",
                      description=("Dense SDPA (cuDNN, FlashAttention on CUDA) against every lvsa backend at "
                                   "the shapes of Wan 2.1, HunyuanVideo 1.5 (with text) and batch 2; each output "
                                   "checked against the reference; effective TFLOP/s and the ratio to ideal "
                                   "(best dense x density)."),
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p, warmup=2, repeats=5, iters_alias=True)
    from ..bench.attention import add_arguments
    add_arguments(p)
    p.set_defaults(func=_run("attention", p))


def _add_model(bs):
    p = bs.add_parser("model", help="one transformer forward (real architecture, random weights): dense vs lvsa",
                      description=("One denoising step of the real diffusers transformer at real size with random "
                                   "weights (no download) — Wan 2.1 1.3B/14B, HunyuanVideo 1.5 480p, CogVideoX 5B "
                                   "— at batch 1 and 2 and a list of latent frame counts: diffusers' own "
                                   "attention, the best dense baseline (lvsa's processor at full density on the "
                                   "fastest dense kernel) and lvsa per backend, with the attention/rest split "
                                   "and the ceiling rest + dense attention x density. OOM is a result."),
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p, warmup=1, repeats=3)
    m = p.add_argument_group("model")
    m.add_argument("--models", nargs="*", metavar="NAME",
                   help="wan2.1-1.3b wan2.1-14b hunyuanvideo-1.5 cogvideox-5b (default: all; --quick: tiny-*); "
                        "NAME:T,T@B,B sets that model's latent frames and batches")
    m.add_argument("--model-dir", metavar="DIR",
                   help="a local diffusers checkpoint (pipeline or transformer folder): its config and weights")
    m.add_argument("--random-weights", action="store_true", help="with --model-dir: its config, random weights")
    m.add_argument("--frames", type=int, nargs="*", metavar="T_LAT",
                   help="latent frame counts (default: per model, e.g. Wan 21 81 121)")
    m.add_argument("--batches", type=int, nargs="*", metavar="B", help="batch sizes (default: per model; 2 = CFG)")
    m.add_argument("--baselines", nargs="+", choices=["diffusers", "dense", "none"], default=["diffusers", "dense"],
                   metavar="{diffusers,dense,none}",
                   help="dense baselines to time: diffusers' own attention, lvsa's best dense (none: only lvsa "
                        "backends); leave out what another results file has (`lvsa bench report` merges files)")
    m.add_argument("--height", type=int, help="video height (default: the model's, 480)")
    m.add_argument("--width", type=int, help="video width (default: the model's, 832 or 720)")
    t = p.add_argument_group("time")
    t.add_argument("--min-repeats", type=int, default=1, help="timed forwards at least")
    t.add_argument("--max-time", type=float, default=20.0,
                   help="stop repeating a variant once its timed forwards took this many seconds")
    t.add_argument("--budget-s", type=float, default=0.0,
                   help="skip rows whose estimated cost no longer fits in this many seconds (0: no limit)")
    d = p.add_argument_group("multi-GPU")
    d.add_argument("--world-size", type=int, default=0,
                   help="run on N GPUs with context parallelism (re-launched under torchrun)")
    d.add_argument("--cp-mode", default="auto", choices=["auto", "ulysses", "sequence"],
                   help="lvsa's context-parallel mode")
    d.add_argument("--single-gpu-results", nargs="+", metavar="JSON",
                   help="1-GPU results files (merged, the newest file per variant wins): their diffusers, "
                        "dense and backend times are the 1-GPU column, speedup and efficiency; the backends "
                        "they lack are timed on rank 0")
    d.add_argument("--no-profile-comm", dest="profile_comm", action="store_false",
                   help="skip the profiled forward (lvsa rows) that measures the NCCL share")
    p.set_defaults(func=_run("model", p))


def _add_report(bs):
    p = bs.add_parser("report", help="regenerate the README's performance sections from results files",
                      description=("Write the performance tables of `lvsa bench model` and `lvsa bench attention` "
                                   "results into README.md between the lvsa-bench markers (or print them). "
                                   "Several files merge: 1-GPU model files into the main table, multi-GPU files "
                                   "into the multi-GPU table, attention files into the attention table "
                                   "(lvsa-bench-attention markers); a row (model, T_lat, batch, world size; or "
                                   "an attention shape) measured in several files takes each variant from the "
                                   "newest file (meta date) that has it."))
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="results JSON files, in any order")
    p.add_argument("--single-gpu-results", nargs="+", metavar="JSON", default=[],
                   help="1-GPU results files whose times fill the multi-GPU table's 1-GPU columns where "
                        "its own records lack them")
    p.add_argument("--readme", default="README.md", help="the file whose section is replaced")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the section, change nothing")
    p.add_argument("--check", action="store_true", help="exit 1 if the README's section is not up to date")
    p.set_defaults(func=_report)


def _argv(parser: argparse.ArgumentParser, args) -> list:
    """The arguments that reproduce ``args`` (for the results' command line and torchrun)."""
    out = []
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help",):
            continue
        val = getattr(args, a.dest, None)
        if val == a.default or val is None:
            continue
        flag = next(o for o in a.option_strings if o.startswith("--"))
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            out.append(flag)
        elif isinstance(val, (list, tuple)):
            out += [flag] + [str(v) for v in val]
        else:
            out += [flag, str(val)]
    return out


def _run(what: str, parser):
    def cmd(args) -> int:
        args.argv = _argv(parser, args)
        for name in ("warmup", "repeats"):
            if getattr(args, name) < (1 if name == "repeats" else 0):
                raise ValueError(f"--{name} must be >= {1 if name == 'repeats' else 0}")
        if what == "model":
            from ..bench import model
            return model.main(args)
        from ..bench import attention
        return attention.main(args)
    return cmd


def _report(args) -> int:
    from ..bench import report
    return report.main(args)
