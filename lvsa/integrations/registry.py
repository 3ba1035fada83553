"""The family adapters lvsa knows, and lookups by transformer or family name.

Kept apart from :mod:`lvsa.integrations.base` (which the adapters import) so imports run
one way: base ← adapters ← registry.
"""
from __future__ import annotations

from typing import List

from . import cogvideox, hunyuan, wan
from .base import Adapter

ADAPTERS: List[Adapter] = [wan.ADAPTER, hunyuan.ADAPTER, cogvideox.ADAPTER]


def adapter_for_transformer(transformer) -> Adapter:
    for a in ADAPTERS:
        if a.matches(transformer):
            return a
    raise TypeError(
        f"lvsa has no adapter for {type(transformer).__name__}; supported: Wan 2.1/2.2 "
        "(WanTransformer3DModel), HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel), "
        "CogVideoX (CogVideoXTransformer3DModel)")


def adapter_for_family(family: str) -> Adapter:
    for a in ADAPTERS:
        if a.family == family:
            return a
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(a.family for a in ADAPTERS)}")
