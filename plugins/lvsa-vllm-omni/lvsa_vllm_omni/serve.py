"""``python -m lvsa_vllm_omni.serve MODEL [vllm serve options]``: a thin convenience.

It runs ``vllm serve MODEL --omni --diffusion-attention-config
'{"per_role": {"self": {"backend": "LVSA"}}}' …`` (merging LVSA into a
``--diffusion-attention-config`` you pass, for the ``self`` role only), after
printing that exact command with the ``LVSA_*`` variables in force, so the same run
can be made without this wrapper. ``--dry-run`` prints and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from typing import List, Sequence, Tuple

ROLE = "self"
FLAG = "--diffusion-attention-config"


def _merge_config(raw: str | None) -> str:
    try:
        cfg = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"lvsa_vllm_omni.serve: {FLAG} is not valid JSON ({e.msg}): {raw!r}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"lvsa_vllm_omni.serve: {FLAG} must be a JSON object, got {raw!r}")
    per_role = cfg.setdefault("per_role", {})
    current = per_role.get(ROLE)
    backend = current.get("backend") if isinstance(current, dict) else current
    if backend not in (None, "LVSA", "lvsa"):
        raise SystemExit(f"lvsa_vllm_omni.serve: {FLAG} already selects {backend!r} for the {ROLE!r} role; "
                         "drop it or run `vllm serve` yourself")
    per_role[ROLE] = {"backend": "LVSA"}
    return json.dumps(cfg, separators=(",", ":"))


def build_command(model: str, rest: Sequence[str]) -> List[str]:
    """The ``vllm serve`` argv for ``model`` with LVSA selected for self-attention."""
    rest = list(rest)
    raw = None
    out: List[str] = []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == FLAG and i + 1 < len(rest):
            raw = rest[i + 1]
            i += 2
            continue
        if a.startswith(FLAG + "="):
            raw = a.split("=", 1)[1]
            i += 1
            continue
        out.append(a)
        i += 1
    cmd = ["vllm", "serve", model]
    if "--omni" not in out:
        cmd.append("--omni")
    return cmd + [FLAG, _merge_config(raw)] + out


def lvsa_env(env=None) -> List[Tuple[str, str]]:
    env = os.environ if env is None else env
    return [(k, env[k]) for k in sorted(env) if k.startswith("LVSA_")]


def render(cmd: Sequence[str], env=None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in lvsa_env(env))
    line = shlex.join(cmd)
    return f"{prefix} {line}" if prefix else line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lvsa_vllm_omni.serve",
        description="vllm serve MODEL --omni with lvsa (LVSA) as the diffusion self-attention backend; "
                    "other options go to vllm serve unchanged; lvsa settings via LVSA_* / LVSA_CONFIG")
    ap.add_argument("model", help="model id or local directory (as for vllm serve)")
    ap.add_argument("--dry-run", action="store_true", help="print the command and exit")
    args, rest = ap.parse_known_args(argv)
    cmd = build_command(args.model, rest)
    print(f"[LVSA] lvsa_vllm_omni.serve runs: {render(cmd)}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    exe = shutil.which(cmd[0])
    if exe is None:
        print("lvsa_vllm_omni.serve: `vllm` is not on PATH; install vllm-omni 0.30 "
              "(pip install 'lvsa-vllm-omni[vllm-omni]') or run the printed command where it is",
              file=sys.stderr)
        return 2
    os.execv(exe, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
