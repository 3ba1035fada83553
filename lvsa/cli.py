"""The ``lvsa`` command: it wires the subcommands of :mod:`lvsa.commands`.

argparse subcommands (as vllm and FastVideo do); every subcommand has a complete
``--help``. Each subcommand lives in its own module under ``lvsa/commands`` and adds its
own parser through ``register(subparsers)``; this file only lists them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from . import __version__

#: subcommand modules under ``lvsa.commands``, in ``--help`` order
COMMANDS = ("plan", "info", "generate", "decode", "doctor", "bench", "compare", "warmup")


# ----------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvsa", description="lvsa: block-sparse attention for long-video diffusion transformers")
    parser.add_argument("--version", action="version", version=f"lvsa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        _register(sub, name)
    return parser


#: command -> (names it registers, the extra it needs) for commands whose module cannot be imported
_PLACEHOLDER_NAMES = {"generate": (("generate",), "diffusers"), "decode": (("decode",), "diffusers")}


def _register(sub, name: str) -> None:
    try:
        mod = importlib.import_module(f".commands.{name}", __package__)
    except ImportError as e:  # an optional extra is missing: say how to get it
        names, extra = _PLACEHOLDER_NAMES.get(name, ((name,), name))
        for n in names:
            p = sub.add_parser(n, help=f"(needs the {extra} extra: pip install 'lvsa[{extra}]')")
            p.set_defaults(func=lambda a, _e=e, _x=extra: _missing_extra(_e, _x), _placeholder=True)
        return
    mod.register(sub)


def _missing_extra(err, extra: str = "diffusers") -> int:
    print(f"lvsa: this command needs the {extra} extra ({err}); pip install 'lvsa[{extra}]'",
          file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "_placeholder", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"lvsa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
