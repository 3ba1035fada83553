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

Collectives on gloo: ``ProcessGroupGloo`` runs each collective on a worker thread, and
that thread drops its references to the collective's tensors only *after* it has woken the
caller's ``wait()``. A buffer the caller lets go right after the call (lvsa's exchange drops
its receive or send buffer there) was therefore freed now at once, now a moment later,
on the worker thread, after the caller had made its next allocation: the same forward
measured 6U or 6.25U (the receive buffer still alive beside the ``LVSA_CHECK``
finiteness mask of the next call). NCCL does not do this (per ``ProcessGroupNCCL.hpp``:
``wait()`` clears its stash of the inputs, the watchdog's copy of a work holds no
outputs), so there the caller's last reference frees the buffer. While a
:class:`LiveBytes` is active, the ``torch.distributed`` collectives lvsa calls return
only once the process group holds none of their tensors
(:func:`collectives_release_on_return`): the count is that of a backend that lets go on
return, the same in every run.
"""
from __future__ import annotations

import contextlib
import functools
import time
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


#: the collectives lvsa.parallel calls (all_gather_single: torch 2.12's name of all_gather_into_tensor)
COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "all_gather_single")


def _uses(storage) -> int:
    """References to a storage: its tensors, its Python object, a process group's copies."""
    return torch._C._storage_Use_Count(storage._cdata)


def _released_on_return(fn, deadline_s: float):
    @functools.wraps(fn)
    def call(output, input, *args, **kwargs):
        if kwargs.get("async_op"):
            return fn(output, input, *args, **kwargs)
        storages = [output.untyped_storage(), input.untyped_storage()]
        before = [_uses(st) for st in storages]
        # fresh views: the process group's references to them are the only extra references
        # to the storages once the call has returned, gone when its worker drops them
        result = fn(output.view(output.shape), input.view(input.shape), *args, **kwargs)
        deadline = time.monotonic() + deadline_s
        while [_uses(st) for st in storages] != before:
            if time.monotonic() > deadline:  # a guard against a hang, not a timing check
                raise RuntimeError(f"{fn.__name__}: the process group still holds the collective's tensors "
                                   f"{deadline_s:g}s after it returned")
            time.sleep(0)
        return result
    return call


@contextlib.contextmanager
def collectives_release_on_return(deadline_s: float = 60.0):
    """``torch.distributed``'s collectives (:data:`COLLECTIVES`) return only once the process
    group holds no reference to their tensors (see the module's note on gloo)."""
    import torch.distributed as dist

    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    for name, fn in saved.items():
        setattr(dist, name, _released_on_return(fn, deadline_s))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._settled = contextlib.ExitStack()
        self._live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._windows: List[Window] = []
        self._roots = _roots()

    def __enter__(self):
        self._settled.enter_context(collectives_release_on_return())
        try:
            return super().__enter__()
        except BaseException:
            self._settled.close()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._settled.close()

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
