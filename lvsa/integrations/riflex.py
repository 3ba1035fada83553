"""RIFLEx length extrapolation (Zhao et al., arXiv 2502.15894) on the temporal rotary embedding.

Past its training horizon a video DiT tends to repeat itself: one temporal RoPE component,
the *intrinsic frequency*, completes a period inside the longer clip and the model
re-renders what it saw one period earlier. RIFLEx lowers just that component so that
one period covers the whole clip; every other frequency stays as trained.

The facts used here (the paper's notation, ``j = 1 … d/2`` over the temporal dims):

* temporal component ``j`` turns at ``θ_j`` radians per latent frame; its period is
  ``N_j = 2π / θ_j`` latent frames (Eq. 4);
* the intrinsic component ``k`` is the one behind the repetition: the authors pick it as
  the component whose period is closest to the first repeated frame (Eq. 7), which lies
  past the training length ``L``. lvsa derives it from ``L`` alone, without a run to
  observe: ``k`` is the highest frequency whose period is at least ``L`` latent frames
  (every faster component completes a period inside the training clips; this one is the
  first that wraps only past them). With the models' own ``L`` this reproduces the
  authors' published choices: HunyuanVideo (base 256, 16 temporal dims, L=33) k=4,
  period 50; CogVideoX-5B (base 10000, 16 dims, L=13) k=2, period 20; for Wan 2.1 (44
  dims, L=21) it gives k=4, period 22. ``L`` is the family's reference horizon (21 Wan,
  33 HunyuanVideo 1.5, 13 CogVideoX) or ``reference_latent_frames`` when set;
  ``riflex_k`` overrides ``k``. (A model none of whose periods reaches ``L`` uses its
  slowest component.)
* for a clip of ``L'`` latent frames the component is lowered so its period exceeds
  the clip (Eq. 8, ``θ'_k ≤ 2π / L'``); as in the authors' release, with a 10% margin:
  ``θ'_k = 0.9 · 2π / L'`` (period ``L' / 0.9``). A component whose period already
  covers that is left alone (lowering only), and at ``L' ≤ L`` nothing changes.

How it reaches the model: the tables diffusers builds are modified after they are built,
never the module's own buffers, so :func:`lvsa.disable` (which removes the hooks)
restores the original embedding exactly. One small hook per family:

* Wan 2.x: a forward hook on ``transformer.rope`` (``WanRotaryPosEmbed``), table
  ``[1, S, 1, D]``, temporal dims first (``rope.t_dim``);
* HunyuanVideo 1.5: a forward hook on ``transformer.rope``, table ``[S, D]``, temporal
  dims first (``rope.rope_dim[0]``);
* CogVideoX: the pipeline builds the table (``_prepare_rotary_positional_embeddings``) and
  passes it as ``image_rotary_emb``: a forward pre-hook on the transformer rewrites that
  argument; temporal dims first (``attention_head_dim // 4``).

Every table is frame-major with interleaved (cos, cos, …) pairs, so component ``j``
lives in columns ``2(j-1), 2(j-1)+1`` of every row of frame ``f`` (angle ``f · θ_j``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..ops import cacheable

#: the authors' margin: the clip spans at most 90% of the lowered component's period
MARGIN = 0.9

#: RIFLEx tables one pipeline keeps (Wan 2.2 A14B's two experts, a few recent geometries)
TABLE_CACHE = 4


# ------------------------------------------------------------------ the formula
def periods(freqs: Sequence[float]) -> List[float]:
    """``N_j = 2π / θ_j`` in latent frames for each temporal frequency (Eq. 4)."""
    return [2 * math.pi / f if f > 0 else math.inf for f in freqs]


def intrinsic_index(freqs: Sequence[float], train_length: int) -> int:
    """The 1-based ``k`` of the highest frequency whose period spans ``train_length`` latent frames.

    ``freqs`` run highest first (as RoPE builds them); without any such period, the slowest.
    """
    ps = periods(freqs)
    spanning = [j for j in range(len(ps)) if ps[j] >= train_length]
    if spanning:
        return min(spanning, key=lambda j: ps[j]) + 1
    return max(range(len(ps)), key=lambda j: ps[j]) + 1


def riflex_frequency(target_length: int) -> float:
    """``θ'_k = 0.9 · 2π / L'``: one period covers ``L'`` latent frames with a 10% margin (Eq. 8)."""
    return MARGIN * 2 * math.pi / target_length


def check_k(k: Optional[int], n_components: int, where: str) -> None:
    """``riflex_k`` must name one of the ``n_components`` temporal components (1-based)."""
    if k is not None and not 1 <= k <= n_components:
        raise ValueError(f"riflex_k={k} is out of range: {where} has {n_components} temporal RoPE "
                         f"components (k = 1 … {n_components}); unset LVSA_RIFLEX_K to pick it from the "
                         "reference horizon")


@dataclass(frozen=True)
class RiflexPlan:
    """What RIFLEx does to one table: component ``k`` (1-based) from ``theta`` to ``new_theta``."""

    k: int
    theta: float
    new_theta: float
    reference: int
    target: int

    @property
    def period(self) -> float:
        return 2 * math.pi / self.theta

    @property
    def new_period(self) -> float:
        return 2 * math.pi / self.new_theta

    @property
    def changed(self) -> bool:
        return self.new_theta != self.theta


def plan(freqs: Sequence[float], reference: int, target: int, k: Optional[int] = None) -> RiflexPlan:
    """The RIFLEx change for temporal frequencies ``freqs`` (rad/latent frame, highest first)."""
    if k is None:
        k = intrinsic_index(freqs, reference)
    else:
        check_k(k, len(freqs), "this model")
    theta = float(freqs[k - 1])
    new = theta
    if target > reference:
        new = min(theta, riflex_frequency(target))  # lower only (Eq. 8 is an upper bound)
    return RiflexPlan(k, theta, new, reference, target)


def table_frequencies(cos: torch.Tensor, sin: torch.Tensor, T: int, t_dim: int) -> List[float]:
    """The temporal frequencies a table really uses, read from its frame-1 row: ``atan2(sin, cos)``.

    Exact for RoPE frequencies (all below π rad/frame); needs ``T >= 2``.
    """
    D = cos.shape[-1]
    c = cos.reshape(T, -1, D)[1, 0, 0:t_dim:2].double()
    s = sin.reshape(T, -1, D)[1, 0, 0:t_dim:2].double()
    return torch.atan2(s, c).tolist()


def apply_plan(cos: torch.Tensor, sin: torch.Tensor, T: int, p: RiflexPlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """New ``(cos, sin)`` tables (same shape, dtype, device) with component ``p.k`` at ``p.new_theta``.

    The inputs are not modified; every other column is copied bit for bit.
    """
    D = cos.shape[-1]
    ang = torch.arange(T, dtype=torch.float64, device=cos.device) * p.new_theta
    cols = slice(2 * (p.k - 1), 2 * p.k)
    out = []
    for table, fn in ((cos, torch.cos), (sin, torch.sin)):
        t = table.clone()
        view = t.view(T, -1, D) if t.is_contiguous() else None
        if view is None:
            t = t.contiguous()
            view = t.view(T, -1, D)
        view[:, :, cols] = fn(ang).to(table.dtype).view(T, 1, 1)
        out.append(t)
    return out[0], out[1]


# ------------------------------------------------------------------ the hooks
class Riflex:
    """RIFLEx on one lvsa-enabled pipeline: decides per table, announces once per generation."""

    def __init__(self, engine, family: str):
        self.engine = engine
        self.family = family
        self.k = engine.config.riflex_k
        self._announced: set = set()
        self._generation: Optional[int] = None
        self.last_plan: Optional[RiflexPlan] = None
        self._plan_generation: Optional[int] = None
        # the temporal frequencies of each rotary source, and the RIFLEx tables last built: a
        # denoising loop hands the hooks the same table on every step (see :meth:`table`)
        self._freqs: Dict[Tuple[Any, ...], List[float]] = {}
        self._tables: "OrderedDict[Tuple[Any, ...], Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def check_k(self, n_components: int, where: str) -> None:
        check_k(self.k, n_components, where)

    def summary(self) -> Optional[Dict[str, Any]]:
        """What RIFLEx did in the current generation (``None``: no table reached it)."""
        from .. import telemetry

        p = self.last_plan
        if p is None or self._plan_generation != telemetry.SESSION.generation:
            return None
        return {"k": p.k, "period": p.period, "new_period": p.new_period, "reference": p.reference,
                "target": p.target, "changed": p.changed}

    def table(self, cos: torch.Tensor, sin: torch.Tensor, T: int, tokens_per_frame: int,
              t_dim: int, source: Any = None, grid: Optional[Tuple[int, ...]] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The RIFLEx version of one ``(cos, sin)`` table of ``T`` latent frames.

        ``source`` names what built the table (the rotary module, or the transformer whose
        caller passes it) and ``grid`` its token grid ``(T, h, w)``: diffusers' table is a
        function of the two, so with a ``source`` the frequencies are read once per source
        (and dtype, device) and the RIFLEx table is built once per (source, geometry, frames,
        ``k``, new period, dtype, device) and reused on every later step and generation.
        Without a ``source`` every call reads and builds; a table that requires grad is
        built on every call. A cached table is a normal tensor (not an inference tensor) even
        when built under ``torch.inference_mode()``, so it serves later forwards under
        autograd (fine-tuning the same transformer) as well.
        """
        from .. import telemetry

        reference = int(self.engine.reference)
        rows = cos.numel() // cos.shape[-1]
        if rows != T * tokens_per_frame or sin.shape != cos.shape:
            # e.g. a table already sharded by context parallelism: say so, change nothing
            self._announce(("mismatch", rows, T), lambda: telemetry.emit("warning", message=(
                f"riflex: the {self.family} rotary table has {rows} rows, not T_lat*P={T}*{tokens_per_frame}; "
                "RIFLEx leaves it unchanged (diffusers context parallelism hands lvsa a sharded table)")))
            return cos, sin
        if T < 2:  # a single frame has no temporal frequency to read or change
            return cos, sin
        fkey = (source, t_dim, cos.dtype, cos.device)
        freqs = self._freqs.get(fkey) if source is not None else None
        if freqs is None:
            freqs = table_frequencies(cos, sin, T, t_dim)
            if source is not None:
                self._freqs[fkey] = freqs
        p = plan(freqs, reference, T, self.k)
        self.last_plan, self._plan_generation = p, telemetry.SESSION.generation
        self._announce(("plan", T, p.k), lambda: telemetry.emit(
            "riflex", k=p.k, period=p.period, new_period=p.new_period, T=T, reference=reference,
            changed=p.changed, components=t_dim // 2))
        if not p.changed:  # T <= reference, or the period already covers T: diffusers' own tables
            return cos, sin
        if source is None or cos.requires_grad or sin.requires_grad:
            # a table in an autograd graph is not reused: a later backward would run through
            # the graph of the forward that built it a second time
            return apply_plan(cos, sin, T, p)
        key = (source, tuple(grid or (T, tokens_per_frame)), tuple(cos.shape), T, p.k, p.new_period,
               cos.dtype, cos.device)
        hit = self._tables.get(key)
        if hit is None:
            # a normal tensor even under torch.inference_mode(), so that it serves a later
            # forward under autograd (fine-tuning the same transformer) as well
            with cacheable():
                hit = self._tables[key] = apply_plan(cos, sin, T, p)
            while len(self._tables) > TABLE_CACHE:
                self._tables.popitem(last=False)  # the least recently used geometry
        else:
            self._tables.move_to_end(key)
        return hit

    def _announce(self, key, emit: Callable[[], Any]) -> None:
        from .. import telemetry

        gen = telemetry.SESSION.generation  # once per generation (and geometry)
        if gen != self._generation:
            self._generation, self._announced = gen, set()
        if key not in self._announced:
            self._announced.add(key)
            emit()


def _wan(rx: Riflex, tr) -> List[Any]:
    rope = tr.rope
    rx.check_k(rope.t_dim // 2, "this Wan transformer")

    def hook(module, args, output):
        hs = args[0]
        p_t, p_h, p_w = module.patch_size
        T, h, w = hs.shape[2] // p_t, hs.shape[3] // p_h, hs.shape[4] // p_w
        return rx.table(output[0], output[1], T, h * w, module.t_dim, source=module, grid=(T, h, w))

    return [rope.register_forward_hook(hook)]


def _hunyuan(rx: Riflex, tr) -> List[Any]:
    rope = tr.rope
    t_dim = int(rope.rope_dim[0])
    rx.check_k(t_dim // 2, "this HunyuanVideo 1.5 transformer")

    def hook(module, args, output):
        hs = args[0]
        T = hs.shape[2] // module.patch_size_t
        h, w = hs.shape[3] // module.patch_size, hs.shape[4] // module.patch_size
        return rx.table(output[0], output[1], T, h * w, t_dim, source=module, grid=(T, h, w))

    return [rope.register_forward_hook(hook)]


def _cogvideox(rx: Riflex, tr) -> List[Any]:
    cfg = tr.config
    if not cfg.use_rotary_positional_embeddings:
        raise ValueError("riflex=True, but this CogVideoX model has no rotary position embedding "
                         "(use_rotary_positional_embeddings=False, e.g. CogVideoX-2B): RIFLEx does not apply; "
                         "drop riflex / LVSA_RIFLEX for it")
    t_dim = int(cfg.attention_head_dim) // 4  # as diffusers' get_3d_rotary_pos_embed splits the head
    rx.check_k(t_dim // 2, "this CogVideoX transformer")

    def pre_hook(module, args, kwargs):
        emb = kwargs.get("image_rotary_emb")
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if emb is None or hs is None:
            return None
        p, p_t = cfg.patch_size, cfg.patch_size_t or 1
        T = hs.shape[1] // p_t  # CogVideoX latents are [B, F, C, H, W]
        h, w = hs.shape[3] // p, hs.shape[4] // p
        kwargs = dict(kwargs)
        # the pipeline builds the table from the grid alone (_prepare_rotary_positional_embeddings)
        kwargs["image_rotary_emb"] = rx.table(emb[0], emb[1], T, h * w, t_dim, source=module, grid=(T, h, w))
        return args, kwargs

    return [tr.register_forward_pre_hook(pre_hook, with_kwargs=True)]


FAMILY_HOOKS = {"wan": _wan, "hunyuan": _hunyuan, "cogvideox": _cogvideox}


def install(state, transformer) -> List[Any]:
    """RIFLEx hooks for one transformer of an lvsa-enabled pipeline; returns their handles."""
    rx = getattr(state, "riflex", None)
    if rx is None:
        rx = state.riflex = Riflex(state.engine, state.adapter.family)
    return FAMILY_HOOKS[state.adapter.family](rx, transformer)
