"""Thin wrapper kept for the commands recorded in benchmarks/NOTES.md: the attention
benchmark now ships with lvsa as ``lvsa bench attention`` (:mod:`lvsa.bench.attention`).

    python benchmarks/bench_attention.py --selfcheck --shapes wan1.3b-t81 --iters 5
    # is the same as
    lvsa bench attention --selfcheck --shapes wan1.3b-t81 --repeats 5
"""
import sys

from lvsa.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention"] + sys.argv[1:]))
