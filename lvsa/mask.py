"""The frame-granular block mask that every backend executes.

A :class:`BlockMask` says, for each query latent frame ``f`` of a video of ``T``
frames, which key frames it attends to. The structure is always

    attended(f) = globals  ∪  [window_lo[f], window_hi[f]]

(the window is absent when the window half-width is 0). Token ``i`` of the video
sequence belongs to frame ``i // P``; text tokens, when present, are attended by
every video query and are not part of the mask.

The object is immutable, plain Python data of ``O(T)`` size (globals and one window per
frame); rows, CSR and tensors are derived on request and never cached inside it: each
backend builds what it needs in its plan, and the dispatcher caches the plans.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class MaskSummary:
    """The figures the ``[LVSA]`` log lines print."""

    num_frames: int
    global_count: int
    attended_min: int
    attended_mean: float
    attended_max: int
    density: float
    extension_ratio: Optional[float]


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which key frames each query frame attends to.

    Immutable data: the globals and one window per frame (``O(T)`` memory); the rows,
    the CSR form and the dense picture are derived on request and never cached here
    (the dispatcher caches each backend's plan of a mask).

    Parameters
    ----------
    num_frames : int
        ``T``, latent frames.
    globals_ : tuple of int
        Sorted global (anchor) frames, attended by every query frame.
    windows : tuple of (int, int) or None
        Inclusive ``(lo, hi)`` window per query frame; ``None`` when there is no
        window (``W = 0``, globals only).
    key_frame_interval : int
        The keyframe interval the globals were laid out with.
    offset : int
        Rotation offset of the keyframe grid.
    tokens_per_frame : int, optional
        ``P``; needed only for token-level views.
    reference_frames : int, optional
        The model's training horizon, for :attr:`extension_ratio`.
    """

    num_frames: int
    globals_: Tuple[int, ...]
    windows: Optional[Tuple[Tuple[int, int], ...]]
    key_frame_interval: int = 1
    offset: int = 0
    tokens_per_frame: Optional[int] = None
    reference_frames: Optional[int] = None
    _counts: Tuple[int, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)
    _dense: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        T = self.num_frames
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"BlockMask needs num_frames >= 1, got {T!r}")
        g = tuple(self.globals_)
        if any(not (0 <= x < T) for x in g) or any(b <= a for a, b in zip(g, g[1:])):
            raise ValueError(f"globals must be sorted, unique frames in [0, {T}), got {g}")
        object.__setattr__(self, "globals_", g)
        if self.windows is not None:  # plain (lo, hi) tuples: hashable, equal to planned masks
            object.__setattr__(self, "windows", tuple((int(a), int(b)) for a, b in self.windows))
            if len(self.windows) != T:
                raise ValueError(f"need one window per frame ({T}), got {len(self.windows)}")
            for f, (lo, hi) in enumerate(self.windows):
                if not (0 <= lo <= hi < T):
                    raise ValueError(f"window of frame {f} is ({lo}, {hi}), outside [0, {T})")
        if self.windows is None:
            if not g:
                raise ValueError(f"query frames {list(range(min(T, 8)))} attend to no frame: "
                                 "give globals or a window")
            counts = (len(g),) * T
        else:
            # globals in [lo, hi] by prefix sums: O(T) memory, no row is built
            pre = [0] * (T + 1)
            gi = 0
            for f in range(T):
                if gi < len(g) and g[gi] == f:
                    gi += 1
                pre[f + 1] = gi
            G = len(g)
            counts = tuple(G + (hi - lo + 1) - (pre[hi + 1] - pre[lo]) for lo, hi in self.windows)
        object.__setattr__(self, "_counts", counts)
        object.__setattr__(self, "_dense", all(c == T for c in counts))
        object.__setattr__(self, "_hash", hash((T, g, self.windows)))

    # ------------------------------------------------------------------ views
    @property
    def globals(self) -> Tuple[int, ...]:
        return self.globals_

    def _check_frame(self, frame: int) -> int:
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < self.num_frames:
            raise IndexError(f"frame {frame!r} is outside this mask's frames [0, {self.num_frames}) "
                             "(negative indices are not accepted)")
        return frame

    def attended(self, frame: int) -> Tuple[int, ...]:
        """Sorted key frames attended by query frame ``frame`` (``0 <= frame < T``)."""
        self._check_frame(frame)
        if self.windows is None:
            return self.globals_
        lo, hi = self.windows[frame]
        g = self.globals_
        i = bisect.bisect_left(g, lo)
        j = bisect.bisect_right(g, hi)
        return g[:i] + tuple(range(lo, hi + 1)) + g[j:]

    @property
    def attended_lists(self) -> Tuple[Tuple[int, ...], ...]:
        """Every row (built on request: ``O(nnz)``)."""
        return tuple(self.attended(f) for f in range(self.num_frames))

    def attended_count(self, frame: int) -> int:
        return self._counts[self._check_frame(frame)]

    @property
    def attended_counts(self) -> Tuple[int, ...]:
        """Attended key frames per query frame, ``O(T)``."""
        return self._counts

    def window(self, frame: int) -> Optional[Tuple[int, int]]:
        """``(lo, hi)`` of query frame ``frame`` (``0 <= frame < T``), ``None`` without windows."""
        self._check_frame(frame)
        return None if self.windows is None else self.windows[frame]

    @property
    def is_dense(self) -> bool:
        """Every query frame attends to every frame (dense by design)."""
        return self._dense

    def nnz(self) -> int:
        """Number of attended (query frame, key frame) blocks."""
        return sum(self._counts)

    def density(self) -> float:
        return self.nnz() / float(self.num_frames * self.num_frames)

    def sparsity(self) -> float:
        """Fraction of frame blocks skipped (0 = dense)."""
        return 1.0 - self.density()

    @property
    def extension_ratio(self) -> Optional[float]:
        if not self.reference_frames:
            return None
        return self.num_frames / float(self.reference_frames)

    def summary(self) -> MaskSummary:
        counts = self._counts
        return MaskSummary(
            num_frames=self.num_frames,
            global_count=len(self.globals_),
            attended_min=min(counts),
            attended_mean=sum(counts) / len(counts),
            attended_max=max(counts),
            density=self.density(),
            extension_ratio=self.extension_ratio,
        )

    # ------------------------------------------------------------- CSR form
    @property
    def indptr(self) -> Tuple[int, ...]:
        """CSR row pointers over query frames, length ``T + 1``."""
        out = [0]
        for c in self._counts:
            out.append(out[-1] + c)
        return tuple(out)

    @property
    def indices(self) -> Tuple[int, ...]:
        """CSR column indices (key frames), concatenated rows, each sorted."""
        return tuple(c for f in range(self.num_frames) for c in self.attended(f))

    def csr_tensors(self, device=None):
        """``(indptr, indices)`` as new int32 torch tensors on ``device`` (not cached:
        a backend keeps them in its plan, which the dispatcher caches)."""
        import torch

        return (torch.tensor(self.indptr, dtype=torch.int32, device=device),
                torch.tensor(self.indices, dtype=torch.int32, device=device))

    # ------------------------------------------------------------ dense form
    def to_dense(self, level: str = "frame", tokens_per_frame: Optional[int] = None):
        """Boolean attention mask, ``True`` = attended.

        ``level="frame"`` gives ``[T, T]``; ``level="token"`` gives ``[T*P, T*P]``
        (for small sizes only: it refuses more than 2**26 elements).
        """
        import torch

        T = self.num_frames
        m = torch.zeros(T, T, dtype=torch.bool)
        for f in range(T):
            m[f, list(self.attended(f))] = True
        if level == "frame":
            return m
        if level != "token":
            raise ValueError(f"level must be 'frame' or 'token', got {level!r}")
        P = tokens_per_frame or self.tokens_per_frame
        if not P:
            raise ValueError("token-level to_dense needs tokens_per_frame (P)")
        if (T * P) ** 2 > 2**26:
            raise ValueError(
                f"token-level mask of {T * P}x{T * P} is too large to materialise; "
                "use the frame-level mask or CSR"
            )
        return m.repeat_interleave(P, 0).repeat_interleave(P, 1)

    def to_string(self, max_frames: int = 200) -> str:
        """One row per query frame: ``G`` global, ``W`` window, ``X`` both,
        ``.`` skipped; the attended count ends each row."""
        T = self.num_frames
        if T > max_frames:
            return f"<BlockMask picture omitted: T={T} > {max_frames}>"
        gset = set(self.globals_)
        width = len(str(T))
        lines = []
        for f in range(T):
            lo, hi = self.windows[f] if self.windows is not None else (1, 0)
            row = []
            for c in range(T):
                g = c in gset
                w = lo <= c <= hi
                row.append("X" if g and w else "G" if g else "W" if w else ".")
            lines.append(f"{f:>{width}} {''.join(row)} {self._counts[f]}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        P = f", P={self.tokens_per_frame}" if self.tokens_per_frame else ""
        return (
            f"BlockMask(T={self.num_frames}{P}, kfi={self.key_frame_interval}, "
            f"offset={self.offset}, globals={len(self.globals_)}, "
            f"sparsity={self.sparsity():.3f})"
        )

    def __eq__(self, other):
        if not isinstance(other, BlockMask):
            return NotImplemented
        if self is other:
            return True
        if self._hash != other._hash:
            return False
        return (self.num_frames, self.globals_, self.windows) == (
            other.num_frames, other.globals_, other.windows)

    def __hash__(self):
        return self._hash


def dense_mask(num_frames: int, **kw) -> BlockMask:
    """A mask in which every frame attends to every frame."""
    return BlockMask(num_frames, tuple(range(num_frames)), None, key_frame_interval=1, **kw)


def token_ranges(frames: Sequence[int]):
    """Merge sorted frames into inclusive runs ``[(a, b), ...]``."""
    runs = []
    for f in frames:
        if runs and runs[-1][1] == f - 1:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    return [tuple(r) for r in runs]
