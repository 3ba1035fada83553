"""argparse value types shared by the subcommands (not a subcommand: no ``register``)."""
from __future__ import annotations

import argparse
from typing import Optional

#: torch.Generator.manual_seed takes seeds up to 2**64 - 1
MAX_SEED = 2 ** 64 - 1


def int_at_least(lo: int, what: str, hi: Optional[int] = None):
    """An argparse ``type``: an integer in ``[lo, hi]``, else a usage error (exit 2) saying ``what``."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = lo - 1
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


positive_int = int_at_least(1, "a positive integer")
seed_int = int_at_least(0, f"an integer from 0 to 2**64-1 = {MAX_SEED} (the seed range of torch.Generator)",
                        hi=MAX_SEED)
