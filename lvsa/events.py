"""The event record every ``lvsa_event`` hook receives (plain data, no dependencies)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class Event:
    """One decision or measurement: ``kind`` (``schedule``, ``engaged``, ``fallback``,
    ``selection``, ``warning``, ``plugin_error``, ...) and its ``fields``."""

    kind: str
    fields: Dict[str, Any]
    time: float = field(default_factory=time.time)

    def __getitem__(self, key):
        return self.fields[key]

    def get(self, key, default=None):
        return self.fields.get(key, default)
