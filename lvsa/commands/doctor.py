"""``lvsa doctor``: diagnose a run from its log (file or stdin) or the live environment."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

EXIT_HEALTHY, EXIT_FINDINGS, EXIT_UNREADABLE = 0, 1, 2

_EPILOG = """\
examples:
  python run.py 2>&1 | tee run.log; lvsa doctor run.log
  docker logs CONTAINER 2>&1 | lvsa doctor -
  lvsa doctor --env --model hunyuanvideo-1.5
  lvsa doctor run.log --json | jq '.findings[].id'

exit codes: 0 nothing wrong (notes may be printed), 1 findings, 2 unreadable input
(missing, empty, binary, or nothing that looks like a run log).
"""


def register(sub):
    p = sub.add_parser(
        "doctor", help="diagnose a run from its log (or the live environment with --env)",
        description=textwrap.fill(
            "Read a run log (lvsa's own output, or the published LVSA log format, vllm-omni server logs "
            "included) and say what went wrong and what to do: one finding per problem with its evidence "
            "lines, cause and fix as commands. --env checks LVSA_* variables, the reference horizon, "
            "backends (the reasons `lvsa info` gives) and torch_npu.", 88),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", nargs="?", default=None, metavar="LOG",
                   help="the run log to diagnose; - reads standard input")
    p.add_argument("--env", action="store_true", help="check the live environment and installation")
    p.add_argument("--model", default=None, metavar="PRESET",
                   help="with --env: the model to check LVSA_REFERENCE_LATENT_FRAMES against "
                        "(a preset or alias: wan, hunyuan, cogvideox, wan2.2-ti2v-5b, ...)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as fh:
        return fh.read()


def render(d) -> str:
    """A diagnosis as text: findings with evidence, cause, fix; a clean bill when healthy."""
    out = []
    problems = d.problems
    notes = [f for f in d.findings if f.severity != "problem"]
    head = f"lvsa doctor: {d.source}: "
    if problems:
        head += f"{len(problems)} finding{'s' if len(problems) != 1 else ''}"
        head += f", {len(notes)} note{'s' if len(notes) != 1 else ''}" if notes else ""
    else:
        head += "healthy" + (f" ({len(notes)} note{'s' if len(notes) != 1 else ''})" if notes else "")
    out.append(head)
    if not problems:
        gens = d.facts.get("generations") or []
        if gens:
            g = gens[-1]
            out.append(f"  clean bill: lvsa engaged ({g['mode']}) T_lat={g['T_lat']} P={g['P']} "
                       f"seq_len={g['seq_len']}; no fallback during generation.")
        elif d.source == "--env":
            out.append("  clean bill: LVSA_* variables parse and agree; the backends and devices are as listed.")
        else:
            out.append("  clean bill: nothing wrong found.")
    for i, f in enumerate(d.findings, 1):
        tag = "" if f.severity == "problem" else " (note)"
        out.append("")
        out.append(f"[{i}] {f.symptom}{tag}  <{f.id}>")
        if f.evidence:
            out.append("  evidence:")
            for n, t in f.evidence:
                prefix = f"line {n}: " if n else ""
                out.append(f"    {prefix}{t if len(t) <= 240 else t[:237] + '...'}")
        out.append("  cause:")
        out.extend(textwrap.wrap(f.cause, 100, initial_indent="    ", subsequent_indent="    "))
        if f.fix:
            out.append("  fix:")
            out.extend(f"    {c}" for c in f.fix)
        if f.guide:
            out.append(f"  see: troubleshooting guide, {f.guide}")
    return "\n".join(out)


def cmd_doctor(args) -> int:
    from ..doctor import UnreadableInput, check_environment, diagnose, parse_log

    if args.log is None and not args.env:
        print("lvsa doctor: error: give a log file (or - for standard input), or --env", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.model and not args.env:
        print("lvsa doctor: error: --model applies to --env (a log names its own model)", file=sys.stderr)
        return EXIT_UNREADABLE
    results = []
    if args.log is not None:
        src = "<stdin>" if args.log == "-" else args.log
        try:
            results.append(diagnose(parse_log(_read(args.log), src)))
        except OSError as e:
            print(f"lvsa doctor: error: cannot read {src}: {e.strerror or e}", file=sys.stderr)
            return EXIT_UNREADABLE
        except UnreadableInput as e:
            if args.json:
                print(json.dumps({"source": src, "readable": False, "error": str(e)}, indent=1))
            print(f"lvsa doctor: error: {e}", file=sys.stderr)
            return EXIT_UNREADABLE
    if args.env:
        results.append(check_environment(model=args.model))
    if args.json:
        payload = [r.as_dict() for r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=1, default=str))
    else:
        print("\n\n".join(render(r) for r in results))
    return EXIT_FINDINGS if any(not r.healthy for r in results) else EXIT_HEALTHY
