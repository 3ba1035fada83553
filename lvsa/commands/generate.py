"""``lvsa generate`` and ``lvsa decode`` (the code lives in :mod:`lvsa.generate`)."""
from __future__ import annotations

from .. import generate as _generate  # ImportError without the diffusers extra

#: the subcommand names this module adds (for the missing-extra placeholder)
NAMES = ("generate", "decode")
EXTRA = "diffusers"


def register(sub):
    _generate.add_generate_parser(sub)
    _generate.add_decode_parser(sub)
