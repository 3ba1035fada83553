"""Exact live-memory accounting on the CPU, where torch keeps no allocator statistics.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor storage an op creates is counted
from its creation until it is freed (a ``weakref.finalize`` on the storage, whose Python
object torch keeps for as long as the storage lives). Views, in-place and ``out=`` results
share an input's storage and are not new memory. Memory an op allocates and frees inside
itself (workspaces) is not seen; everything a Python-level path keeps alive is.

>>> with LiveBytes() as m:                                        # doctest: +SKIP
...     with m.window() as w:
...         f()
>>> m.peak, w.peak, [a.nbytes for a in w.allocs]
"""
from __future__ import annotations

import contextlib
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Alloc:
    nbytes: int
    shape: Tuple[int, ...]
    op: str
    where: str  # "lvsa/parallel.py:123": the innermost frame in lvsa or diffusers


@dataclass
class Window:
    """What happened between entering and leaving :meth:`LiveBytes.window`."""

    base: int
    peak: int = 0  # the most live bytes above ``base``
    allocs: List[Alloc] = field(default_factory=list)


def _storage_ptr(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # a wrapper subclass (funcol's AsyncCollectiveTensor): its inner tensor counts
        return None


def _roots() -> Tuple[str, ...]:
    import os

    import lvsa
    roots = [os.path.dirname(lvsa.__file__) + os.sep]
    try:
        import diffusers
        roots.append(os.path.dirname(diffusers.__file__) + os.sep)
    except ImportError:
        pass
    return tuple(roots)


def _where(roots: Tuple[str, ...]) -> str:
    """``package/path.py:line`` of the innermost frame in lvsa or diffusers."""
    for f in reversed(traceback.extract_stack()):
        for r in roots:
            if f.filename.startswith(r):
                return f"{r.rstrip('/').rsplit('/', 1)[-1]}/{f.filename[len(r):]}:{f.lineno}"
    return "?"


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._windows: List[Window] = []
        self._roots = _roots()

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = _storage_ptr(t)
            st = t.untyped_storage() if ptr is not None else None
            if st is None or id(st) in self._live or st.nbytes() == 0 or ptr in inputs:
                continue
            self._live[id(st)] = st.nbytes()
            self.current += st.nbytes()
            weakref.finalize(st, self._free, id(st))
            if self._windows:
                a = Alloc(st.nbytes(), tuple(t.shape), str(func), _where(self._roots))
                for w in self._windows:
                    w.allocs.append(a)
        self.peak = max(self.peak, self.current)
        for w in self._windows:
            w.peak = max(w.peak, self.current - w.base)
        return out

    @contextlib.contextmanager
    def window(self):
        """The peak above the level at entry and every allocation, while inside."""
        w = Window(self.current)
        self._windows.append(w)
        try:
            yield w
        finally:
            self._windows.remove(w)
