"""Context parallelism: one generation over several devices, exact, on ``torch.distributed``.

Two modes, both exact (every rank's output equals the single-device output):

* **ulysses** (head-parallel; ``auto`` picks it when the query and K/V heads divide by
  the world size ``w``): after projection, norm and RoPE on the local sequence shard,
  one ``all_to_all_single`` turns ``[B, S/w, H, D]`` into ``[B, S, H/w, D]``; the
  unchanged single-device backend and schedule run over the whole sequence for the
  local heads; one all-to-all turns the output back. Text tokens (replicated on every
  rank) are sliced to the local heads; text queries attend to the whole video and are
  all-gathered over heads.
* **sequence** (query rows): K/V are all-gathered; each rank computes the query rows
  ``[lo, hi)`` of the *same* single-device mask (``q_rows`` of :func:`lvsa.attention`).
  Any ``S`` divisible by ``w`` works; frames may straddle ranks.

This module holds the collectives (:class:`ContextParallel`), the removable split/gather
hooks that shard the transformer's sequence (:func:`install_hooks`), the process-group
lifecycle of the command line (:func:`distributed`) and the cross-rank consistency check.
No home-made transport: only ``torch.distributed`` (NCCL on CUDA, HCCL on Ascend, gloo
on the CPU).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .errors import ContextParallelError

MODES = ("auto", "ulysses", "sequence")
#: process-group backend per device kind
PG_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
_ERROR_KEY = "lvsa/failed"


# --------------------------------------------------------------- process group
def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return _dist().get_rank() if is_initialized() else 0


def group_world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return _dist().get_world_size() if is_initialized() else 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class DistInfo:
    """What :func:`distributed` set up: ranks, this rank's device, the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    backend: Optional[str] = None
    owned: bool = False  # this context initialised the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _timeout(config=None) -> datetime.timedelta:
    if config is None:
        from .config import current_config
        config = current_config()
    return datetime.timedelta(seconds=float(config.dist_timeout))


def _store():
    try:
        return _dist().distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (group made without one): no error channel
        return None


def report_failure(exc: BaseException) -> None:
    """Record this rank's failure in the group's store, for the other ranks' messages."""
    store = _store() if is_initialized() else None
    msg = f"rank {global_rank()}: {type(exc).__name__}: {exc}".splitlines()[0][:500]
    if store is not None:
        try:
            if not store.check([_ERROR_KEY]):
                store.set(_ERROR_KEY, msg)
        except Exception:  # noqa: BLE001 - the store may be gone with the failed rank
            pass


def peer_failure() -> Optional[str]:
    """The first failure another rank recorded (``"rank N: Error: cause"``), if any."""
    store = _store() if is_initialized() else None
    if store is None:
        return None
    try:
        if store.check([_ERROR_KEY]):
            return store.get(_ERROR_KEY).decode(errors="replace")
    except Exception:  # noqa: BLE001
        return None
    return None


def _collective_error(e: BaseException, what: str) -> BaseException:
    """A failed collective → an error naming the failed rank (or the timeout)."""
    cause = peer_failure()
    me = global_rank()
    if cause is not None and not cause.startswith(f"rank {me}:"):
        return ContextParallelError(f"context parallel: {cause} -- rank {me} stopped in {what}")
    text = str(e)
    if "timeout" in text.lower() or "timed out" in text.lower():
        t = _timeout().total_seconds()
        return ContextParallelError(
            f"context parallel: rank {me} waited {t:g}s in {what} and another rank never reached it "
            f"(LVSA_DIST_TIMEOUT={t:g}); the ranks ran different code or one is stuck: {text.splitlines()[0]}")
    return ContextParallelError(f"context parallel: rank {me} failed in {what}: {type(e).__name__}: "
                                f"{text.splitlines()[0] if text else ''}")


def _dim(dim: int, t: torch.Tensor, what: str) -> int:
    """``dim`` of ``t`` as a non-negative index, the way torch reads it (``-1`` = the last);
    an out-of-range ``dim`` raises before any collective, on every rank alike."""
    n = t.dim()
    if n == 0:
        raise ValueError(f"context parallel {what}: a 0-d tensor has no dimension to {what} along; "
                         "pass a tensor of at least one dimension")
    if not -n <= dim < n:
        raise IndexError(f"context parallel {what}: dim {dim} is out of range for a {n}-D tensor of shape "
                         f"{tuple(t.shape)} (expected {-n} ... {n - 1})")
    return dim % n


@contextlib.contextmanager
def distributed(device_kind: Optional[str] = None, config=None) -> Iterator[DistInfo]:
    """Set up ``torch.distributed`` for a ``torchrun`` launch; always tear it down.

    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) it yields a one-rank :class:`DistInfo`
    and touches nothing. Under ``torchrun`` it initialises the default group for the
    device kind (``nccl`` for cuda, ``hccl`` for npu, ``gloo`` for cpu) with
    ``LVSA_DIST_TIMEOUT``, pins ``cuda:LOCAL_RANK`` (or ``npu:LOCAL_RANK``), and on the
    way out records a failure for the other ranks and runs ``destroy_process_group``.
    A group that already exists is used as it is (and left alone on exit).
    """
    dist = _dist()
    world = env_world_size()
    if is_initialized():
        yield DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       None, dist.get_backend(), owned=False)
        return
    if world <= 1:
        yield DistInfo()
        return
    kind = device_kind or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = PG_BACKENDS.get(kind)
    if backend is None:
        raise ContextParallelError(f"context parallel: no torch.distributed backend for device {kind!r} "
                                   f"(known: {', '.join(f'{k}={v}' for k, v in PG_BACKENDS.items())})")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if kind == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif kind == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu and the hccl backend)

        device = torch.device("npu", local)
        torch.npu.set_device(device)  # type: ignore[attr-defined]
    kw = {"device_id": device} if kind == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=_timeout(config), **kw)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, device, backend, owned=True)
    try:
        yield info
    except BaseException as e:
        report_failure(e)
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def command_session(device_kind: Optional[str] = None, config=None) -> Iterator[DistInfo]:
    """:func:`distributed` for a command: under ``torchrun`` only rank 0 speaks.

    Ranks other than 0 run with ``sys.stdout``/``sys.stderr`` silenced (progress bars,
    notes, summaries) unless ``LVSA_LOG_ALL_RANKS=1``; an exception still leaves the
    context and is reported (with the rank) to the other ranks and the caller.
    """
    with distributed(device_kind, config) as info:
        if config is None:
            from .config import current_config
            config = current_config()
        if not info.active or info.is_main or config.log_all_ranks:
            yield info
            return
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                contextlib.redirect_stderr(devnull):
            yield info


def divisibility_problem(world_size: int, seq_len: Optional[int], heads: Optional[int] = None,
                         mode: str = "auto") -> Optional[str]:
    """Why a run of ``seq_len`` video tokens (and ``heads`` heads) cannot be split over
    ``world_size`` ranks in ``mode``, or ``None`` when it can (checked before loading)."""
    if world_size <= 1:
        return None
    if seq_len is not None and seq_len % world_size:
        fits = [str(n) for n in range(2, 9) if seq_len % n == 0]
        return (f"context parallel: {seq_len} video tokens (T_lat x P) do not divide by {world_size} ranks; "
                "pick --num-frames/--height/--width so that they do"
                + (f", or --nproc-per-node {' / '.join(fits)}" if fits else ""))
    if mode == "ulysses" and heads is not None and heads % world_size:
        return (f"context parallel: --context-parallel ulysses needs the {heads} attention heads to divide by "
                f"{world_size} ranks; use --context-parallel sequence (or auto)")
    return None


# ------------------------------------------------------------ the collectives
@dataclass
class ContextParallel:
    """One context-parallel group and mode, shared by every lvsa processor of a model.

    Parameters
    ----------
    group : ProcessGroup or None
        ``None`` = the default group.
    mode : str
        ``auto`` | ``ulysses`` | ``sequence``.
    source : str
        ``lvsa`` (lvsa's own hooks) or ``diffusers`` (``enable_parallelism``'s Ulysses group).
    """

    group: Any = None
    mode: str = "auto"
    source: str = "lvsa"
    world_size: int = field(init=False)
    rank: int = field(init=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"context_parallel={self.mode!r}: expected one of {', '.join(MODES)}")
        if not is_initialized():
            raise ContextParallelError(
                "context parallel needs torch.distributed initialised: launch with "
                "`torchrun --nproc-per-node N ...` (lvsa generate does the rest) or call "
                "torch.distributed.init_process_group() before lvsa.enable(pipe, context_parallel=...)")
        dist = _dist()
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    # decisions: replicated data only (head counts, global lengths, config)
    def layout(self, heads: int, kv_heads: Optional[int] = None) -> str:
        """``ulysses`` or ``sequence`` for a layer with these head counts."""
        kv = heads if kv_heads is None else kv_heads
        divides = heads % self.world_size == 0 and kv % self.world_size == 0
        if self.mode == "ulysses":
            if not divides:
                raise ContextParallelError(
                    f"context_parallel='ulysses' needs the heads to divide by the world size: {heads} query / "
                    f"{kv} K/V heads on {self.world_size} ranks; use context_parallel='sequence' (or 'auto')")
            return "ulysses"
        if self.mode == "sequence" or not divides:
            return "sequence"
        return "ulysses"

    def rows(self, seq_len: int) -> Tuple[int, int]:
        """This rank's query rows ``[lo, hi)`` of a sequence of ``seq_len`` tokens."""
        n = seq_len // self.world_size
        return self.rank * n, (self.rank + 1) * n

    def check_split(self, seq_len: int, what: str = "sequence") -> None:
        if seq_len % self.world_size:
            raise ContextParallelError(
                f"context parallel: the {what} of {seq_len} tokens does not divide by {self.world_size} ranks; "
                "choose frames/resolution so that T_lat*P is a multiple of the world size, or fewer ranks")

    def _run(self, what, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except ContextParallelError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the failed rank / timeout named
            raise _collective_error(e, what) from e

    # ---------------------------------------------------------------- tensors
    # Memory: every exchange below holds at most its send and its receive buffer at once.
    # The receive buffer is unpacked into the send buffer's storage (free once the
    # collective has returned: NCCL/HCCL order the copy after it on the current stream),
    # never into a third full-size tensor, and local shards handed over in a list are
    # released as soon as they are packed. At Wan 14B's T_lat 121, batch 2, on 2 GPUs one
    # [B, S, H/w, D] bf16 tensor is 1.93 GB: each avoided copy is that much peak memory.

    # Shapes are the collectives' contract: every rank passes the same shape. ``dim`` may be
    # negative (as in torch). A tensor with no elements (batch 0, an empty sequence) gives
    # the empty result of the right shape with no communication: all ranks, holding the
    # same shape, skip alike, and there is nothing to exchange.

    @staticmethod
    def _no_autograd(what: str, *ts: torch.Tensor) -> None:
        """The collectives write into fresh buffers and have no backward: under autograd an
        exchanged q/k/v would come out without its gradients (silently). Refused, before any
        collective (every rank runs the same model code, so every rank refuses alike)."""
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts):
            raise ContextParallelError(
                f"context parallel {what}: autograd is recording (the tensors require grad) and lvsa's "
                "context parallelism is inference-only: its exchanges have no backward, so gradients would "
                "be lost. Run inference under torch.no_grad() or torch.inference_mode() (diffusers' pipelines "
                "do), or set LVSA_CONTEXT_PARALLEL=off to train on one device per model")

    def split(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of ``t`` along ``dim``: a view, no copy (the whole tensor stays
        alive in the caller anyway; a contiguous copy would only add one shard of memory
        whenever dims before ``dim`` are > 1, e.g. batch 2), no communication."""
        dim = _dim(dim, t, "split")
        self.check_split(t.shape[dim])
        return t.chunk(self.world_size, dim=dim)[self.rank]

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim`` (rank order); contiguous.

        The collective concatenates along dim 0; where the dims before ``dim`` hold a few
        slices (batch 2), each slice is gathered straight into its place of the result
        (one collective per slice) rather than into a buffer reordered by a full copy."""
        w = self.world_size
        dim = _dim(dim, t, "all_gather")
        self._no_autograd("all_gather", t)
        shape = tuple(t.shape)
        out_shape = shape[:dim] + (w * shape[dim],) + shape[dim + 1:]
        if t.numel() == 0:
            return t.new_empty(out_shape)
        t = t.contiguous()
        dist = _dist()
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
        lead = 1
        for n in shape[:dim]:
            lead *= n
        if lead <= self.MAX_GATHER_SLICES:
            out = torch.empty(out_shape, dtype=t.dtype, device=t.device)
            dst, src = out.view(lead, -1), t.view(lead, -1)
            for i in range(lead):
                self._run("all_gather", fn, dst[i], src[i], group=self.group)
            return out
        out = torch.empty((w * shape[0],) + shape[1:], dtype=t.dtype, device=t.device)
        self._run("all_gather", fn, out, t, group=self.group)
        return out.view((w,) + shape).movedim(0, dim).flatten(dim, dim + 1)

    #: :meth:`all_gather` gathers slice by slice up to this many leading slices
    MAX_GATHER_SLICES = 8

    def _exchange(self, box: List[torch.Tensor], unpacked: Tuple[int, ...], reuse: bool) -> torch.Tensor:
        """All-to-all of the send buffer ``box[0]`` ``[w, ...]`` (chunk r goes to rank r),
        taken out of ``box``; returns the received chunks permuted by ``unpacked`` (dims of
        the received ``[w, ...]`` buffer in the order wanted), contiguous. ``reuse``: the
        send buffer is ours, the result goes into its storage; else it is dropped before
        the result is allocated. Either way no more than two buffers live at once."""
        send = box.pop()
        recv = torch.empty_like(send)
        if send.numel() == 0:  # nothing to exchange (see the note above split)
            return recv.permute(*unpacked).contiguous()
        self._run("all_to_all", _dist().all_to_all_single, recv, send, group=self.group)
        view = recv.permute(*unpacked)
        if view.is_contiguous():  # e.g. one tensor of batch 1: already in place
            return view
        if reuse:
            out = send.view(view.shape)
        else:
            del send
            out = torch.empty(view.shape, dtype=recv.dtype, device=recv.device)
        return out.copy_(view)

    def _bshd(self, t: torch.Tensor, what: str, heads: bool = False) -> Tuple[int, int, int, int]:
        """``t``'s ``[B, S, H, D]`` sizes; with ``heads``, ``H`` must divide by the world size."""
        if t.dim() != 4:
            raise ValueError(f"context parallel {what}: expected a [batch, tokens, heads, head_dim] tensor, "
                             f"got shape {tuple(t.shape)}")
        B, S, H, D = t.shape
        if heads and H % self.world_size:
            raise ContextParallelError(
                f"context parallel {what}: {H} heads do not divide by {self.world_size} ranks; "
                "use context_parallel='sequence' (or 'auto') for this layer")
        return B, S, H, D

    def seq_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, S/w, H, D]`` (local tokens, all heads) → ``[B, S, H/w, D]`` (all tokens, local heads)."""
        return self.take_seq_to_heads([t])[0]

    def heads_to_seq(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, S, H/w, D]`` → ``[B, S/w, H, D]`` (the inverse of :meth:`seq_to_heads`)."""
        return self.take_heads_to_seq([t])

    def seq_to_heads_many(self, *ts: torch.Tensor) -> List[torch.Tensor]:
        """:meth:`seq_to_heads` of several equal-shaped tensors in one collective; each
        result is contiguous (what the kernels' fast paths want)."""
        return self.take_seq_to_heads(list(ts))

    def take_seq_to_heads(self, ts: List[torch.Tensor]) -> List[torch.Tensor]:
        """:meth:`seq_to_heads_many` of the tensors in the list ``ts``, which it empties:
        each local shard is dropped as soon as it is packed into the send buffer, so a
        caller that handed over its last references holds no shard during the exchange.
        Peak: send + receive buffer (results in the send buffer's storage)."""
        if len(ts) > 1 and not all(t.shape == ts[0].shape and t.dtype == ts[0].dtype for t in ts):
            return [self.take_seq_to_heads([ts.pop(0)])[0] for _ in range(len(ts))]
        n = len(ts)
        B, s, H, D = self._bshd(ts[0], "seq_to_heads", heads=True)
        self._no_autograd("seq_to_heads", *ts)
        w, h = self.world_size, H // self.world_size
        send = torch.empty((w, n, B, s, h, D), dtype=ts[0].dtype, device=ts[0].device)
        for i in range(n):
            t = ts[i]
            ts[i] = None  # type: ignore[call-overload]
            send[:, i].copy_(t.reshape(B, s, w, h, D).permute(2, 0, 1, 3, 4))
            del t
        ts.clear()
        out = self._exchange([send], (1, 2, 0, 3, 4, 5), reuse=True)  # [n, B, w, s, h, D]
        return list(out.reshape(n, B, w * s, h, D).unbind(0))

    def take_heads_to_seq(self, ts: List[torch.Tensor]) -> torch.Tensor:
        """:meth:`heads_to_seq` of the one tensor in the list ``ts``, which it empties (an
        attention output handed over is dropped once packed). Peak: send + receive buffer,
        plus the input where the caller keeps it."""
        (t,) = ts
        B, S, h, D = self._bshd(t, "heads_to_seq")
        self._no_autograd("heads_to_seq", t)
        self.check_split(S)
        ts.clear()
        w = self.world_size
        send = t.reshape(B, w, S // w, h, D).permute(1, 0, 2, 3, 4).contiguous()
        own = send.data_ptr() != t.data_ptr()  # packed by a copy (batch > 1), else a view of t
        del t
        box = [send]
        del send  # at batch 1 `send` is a view of the output: _exchange must hold its last reference
        return self._exchange(box, (1, 2, 0, 3, 4), reuse=own).reshape(B, S // w, w * h, D)

    def attention(self, attend, q, k, v, text_k=None, text_v=None):
        """Exact attention of the video queries of local shards under context parallelism.

        ``q``/``k``/``v`` ``[B, S/w, H(kv), D]`` are this rank's tokens; ``text_k``/``text_v``
        ``[B, L, Hkv, D]`` are replicated. ``attend(q, k, v, text_k, text_v, q_rows)`` is the
        single-device call (e.g. :meth:`lvsa.engine.Engine.attention` or
        :func:`lvsa.attention` with a mask). Returns this rank's output ``[B, S/w, H, D]``,
        equal to those rows of the single-device output.
        """
        return self.take_attention(attend, [q, k, v], text_k, text_v)

    def take_attention(self, attend, qkv: List[torch.Tensor], text_k=None, text_v=None):
        """:meth:`attention` of the shards in the list ``qkv = [q, k, v]``, which it empties:
        a caller that hands over its last references lets each shard go once it is packed
        for the exchange (Ulysses), so the shards and their exchanged copies never coexist.
        Ulysses holds at most: the send and receive buffers of q/k/v; then the exchanged
        q/k/v and the attention output; then the output's send and receive buffers."""
        q, k, v = qkv
        S, dtype = q.shape[1] * self.world_size, q.dtype
        if self.layout(q.shape[2], k.shape[2]) == "ulysses":
            same = q.shape == k.shape
            del q, k, v
            if same:
                qf, kf, vf = self.take_seq_to_heads(qkv)
            else:
                qf = self.take_seq_to_heads([qkv.pop(0)])[0]
                kf, vf = self.take_seq_to_heads(qkv)
            if text_k is not None:
                text_k, text_v = self.head_slice(text_k), self.head_slice(text_v)
            out = [attend(qf, kf, vf, text_k, text_v, None).to(dtype)]
            del qf, kf, vf  # the exchanged q/k/v go before the output's exchange
            return self.take_heads_to_seq(out)
        qkv.clear()
        kf = self.all_gather(k, 1)
        del k
        vf = self.all_gather(v, 1)
        del v
        return attend(q, kf, vf, text_k, text_v, self.rows(S))

    def head_slice(self, t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's heads of a replicated tensor (``[B, L, H, D]``)."""
        n = t.shape[dim] // self.world_size
        return t.narrow(dim, self.rank * n, n)

    # --------------------------------------------------------- consistency
    def agree(self, values: Tuple, what: str) -> None:
        """Raise unless every rank holds the same ``values`` (``LVSA_CHECK=1``)."""
        gathered: List[Any] = [None] * self.world_size
        self._run("consistency check", _dist().all_gather_object, gathered, tuple(values), group=self.group)
        if any(g != gathered[0] for g in gathered):
            lines = ", ".join(f"rank {r}: {g}" for r, g in enumerate(gathered))
            raise ContextParallelError(
                f"context parallel: ranks disagree on {what} -- {lines}; every rank must run the same "
                "geometry, step and schedule (same arguments, settings and LVSA_* variables on every rank)")


def from_diffusers(parallel_config) -> Tuple[Optional[ContextParallel], Optional[str]]:
    """lvsa's view of a diffusers ``enable_parallelism`` config: ``(cp, None)`` for a pure
    Ulysses group, or ``(None, reason)`` when lvsa must hand off (ring, ``*_anything``)."""
    cp_cfg = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp_cfg is None:
        return None, None
    ring = getattr(cp_cfg, "ring_degree", 1) or 1
    if ring > 1 or getattr(cp_cfg, "ring_anything", False):
        return None, "context_parallel"
    if getattr(cp_cfg, "ulysses_anything", False):
        return None, "context_parallel"
    mesh = getattr(cp_cfg, "_ulysses_mesh", None)
    if mesh is None:
        return None, "context_parallel"
    cached = getattr(cp_cfg, "_lvsa_cp", None)
    if cached is None:
        cached = ContextParallel(group=mesh.get_group(), mode="auto", source="diffusers")
        cp_cfg._lvsa_cp = cached
    return cached, None


# ------------------------------------------------------- split/gather hooks
@dataclass(frozen=True)
class Split:
    """Shard an input (``arg``/``kwarg`` of ``module``'s forward) or its output along ``dim``.

    ``only_ndim``: split only tensors of that rank (Wan 2.2 TI2V's per-token timestep).
    A tuple/list value has each of its tensors split.
    """

    module: str
    dim: int
    arg: Optional[int] = None
    kwarg: Optional[str] = None
    output: bool = False
    only_ndim: Optional[int] = None


@dataclass(frozen=True)
class Gather:
    """All-gather ``module``'s output along ``dim`` (back to the whole sequence)."""

    module: str
    dim: int


def _submodule(root, name: str):
    return root if name == "" else root.get_submodule(name)


def _split_value(cp: ContextParallel, v, spec: Split):
    if isinstance(v, torch.Tensor):
        if spec.only_ndim is not None and v.dim() != spec.only_ndim:
            return v
        return cp.split(v, spec.dim)
    if isinstance(v, (tuple, list)):
        return type(v)(_split_value(cp, x, spec) for x in v)
    return v


def install_hooks(transformer, plan: Sequence, cp: ContextParallel) -> List[Any]:
    """Register the plan's split/gather hooks on ``transformer``; returns the removable handles."""
    handles = []
    for spec in plan:
        mod = _submodule(transformer, spec.module)
        if isinstance(spec, Gather):
            def gather(module, args, output, _s=spec):
                if isinstance(output, torch.Tensor):
                    return cp.all_gather(output, _s.dim)
                return type(output)(cp.all_gather(o, _s.dim) if isinstance(o, torch.Tensor) else o
                                    for o in output)
            handles.append(mod.register_forward_hook(gather))
        elif spec.output:
            def split_out(module, args, output, _s=spec):
                return _split_value(cp, output, _s)
            handles.append(mod.register_forward_hook(split_out))
        else:
            def split_in(module, args, kwargs, _s=spec):
                if _s.kwarg is not None and _s.kwarg in kwargs:
                    kwargs = dict(kwargs)
                    kwargs[_s.kwarg] = _split_value(cp, kwargs[_s.kwarg], _s)
                elif _s.arg is not None and len(args) > _s.arg:
                    args = list(args)
                    args[_s.arg] = _split_value(cp, args[_s.arg], _s)
                    args = tuple(args)
                return args, kwargs
            handles.append(mod.register_forward_pre_hook(split_in, with_kwargs=True))
    return handles


# ---------------------------------------------------------- exchange sizes
def exchange_sizes(mask, P: int, world_size: int, heads: int, head_dim: int, batch: int = 1,
                   bytes_per_el: int = 2) -> Dict[str, Any]:
    """Bytes each rank receives per attention layer in sequence mode: the all-gather of
    K/V vs the minimal exchange (only the key frames its query rows attend: global frames
    plus the window halo), and Ulysses' all-to-all, from a :class:`~lvsa.mask.BlockMask`."""
    T = mask.num_frames
    S = T * P
    per_token = 2 * heads * head_dim * batch * bytes_per_el  # K and V
    n = S // world_size
    gather = (S - n) * per_token
    minimal = []
    for r in range(world_size):
        lo, hi = r * n, (r + 1) * n
        f0, f1 = lo // P, (hi - 1) // P
        need = set()
        for f in range(f0, f1 + 1):
            need.update(mask.attended(f))
        tokens = 0
        for f in need:  # tokens of attended frames this rank does not hold
            a, b = f * P, (f + 1) * P
            tokens += (b - a) - max(0, min(b, hi) - max(a, lo))
        minimal.append(tokens * per_token)
    # Ulysses: q, k, v in (3 x (w-1)/w of the local shard), output back (1 x)
    a2a = 4 * (n * heads * head_dim * batch * bytes_per_el) * (world_size - 1) // world_size
    return {"T": T, "P": P, "world_size": world_size, "allgather_bytes": gather,
            "minimal_bytes_max": max(minimal), "minimal_bytes_mean": sum(minimal) / len(minimal),
            "ulysses_bytes": a2a}
