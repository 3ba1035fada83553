"""Glue shared by the diffusers adapters: the per-pipeline state, the ``__call__`` and
``scheduler.step`` wrappers, geometry helpers and the processor base class.

How lvsa reaches a diffusers pipeline (diffusers offers no public way to add an attention
backend; replacing attention processors is the supported hook):

* every self-attention processor of the transformer(s) is replaced by the family's lvsa
  processor (originals kept for :func:`lvsa.disable`);
* the pipeline's class is swapped for a thin subclass whose ``__call__`` computes the
  geometry from the call arguments and the pipeline's own config (VAE factors, patch
  size, default frame count), starts a generation on the :class:`~lvsa.engine.Engine`,
  and tells the engine which denoising step comes next from the step that really
  finished (CFG batched or not), not from counting attention calls: through the pipeline's ``callback_on_step_end`` (chained in
  front of the user's own) where the pipeline has one, else through ``scheduler.step``.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

STATE_ATTR = "_lvsa_state"


# ------------------------------------------------------------------ geometry
from ..geometry import Factors, tokens_from_latent_shape  # noqa: E402,F401 (re-export)
from ..presets import FAMILY_REFERENCE  # noqa: E402


def cfg_get(cfg, key, default=None):
    """Read a field from a diffusers config (FrozenDict / dict / object)."""
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# ------------------------------------------------------------------ adapters
class Adapter:
    """What lvsa needs to know about one model family (one subclass per family file)."""

    family: str = "generic"
    fps: int = 16
    transformer_class: str = ""        # class name of the transformer this adapter serves
    blocks_attr: str = "transformer_blocks"
    attn_attr: str = "attn"            # the self-attention module inside each block
    processor_class: Any = None        # the lvsa processor (a ProcessorBase subclass)
    #: lvsa's split/gather hooks for context parallelism (:class:`lvsa.parallel.Split`/``Gather``)
    cp_plan: Tuple[Any, ...] = ()

    def matches(self, transformer) -> bool:
        return type(transformer).__name__ == self.transformer_class

    def attention_modules(self, transformer) -> List[Tuple[str, Any]]:
        """``(name, module)`` of every self-attention whose processor lvsa replaces."""
        return [(f"{self.blocks_attr}.{i}.{self.attn_attr}", getattr(blk, self.attn_attr))
                for i, blk in enumerate(getattr(transformer, self.blocks_attr))]

    def make_processor(self, engine, original):
        return self.processor_class(engine, original)

    def factors(self, vae_config, transformer_config) -> Factors:
        raise NotImplementedError

    def known_reference(self, pipe) -> int:
        return FAMILY_REFERENCE[self.family]

    def latent_tokens(self, shape, factors: Factors) -> Tuple[int, int]:
        """``(T, P)`` for the transformer's latent input (``[B, C, F, H, W]`` unless overridden)."""
        return tokens_from_latent_shape(shape, factors)

    def call_geometry(self, pipe, args: Dict[str, Any]) -> Optional[Tuple[int, int]]:
        """``(T, P)`` the pipeline will run for these ``__call__`` arguments, or ``None``."""
        return None

    def decode(self, pipe, latents, num_frames=None):
        """Latent (as returned with ``output_type="latent"``) → float video ``[F, H, W, 3]`` in [0, 1]."""
        raise NotImplementedError

    # shared helpers
    def pipe_factors(self, pipe) -> Factors:
        return self.factors(pipe.vae.config, transformers_of(pipe)[0].config)


def transformers_of(pipe) -> List[Any]:
    """The denoising transformers of a pipeline (Wan 2.2 A14B has two), or ``[pipe]`` for a bare model."""
    found = [getattr(pipe, n, None) for n in ("transformer", "transformer_2")]
    found = [getattr(t, "_orig_mod", t) for t in found if t is not None]  # torch.compile'd: the module inside
    if found:
        return found
    if hasattr(pipe, "config") and hasattr(pipe, "named_modules"):
        return [pipe]
    raise TypeError(f"{type(pipe).__name__} has no .transformer: pass a diffusers video pipeline "
                    "(WanPipeline, HunyuanVideo15Pipeline, CogVideoXPipeline) or its transformer")


# --------------------------------------------------------------- fallbacks
class ProcessorBase:
    """Base of the lvsa processors: keeps the original processor to delegate to.

    Delegation (context parallelism, explicit attention masks, shapes lvsa does not
    model) always reports a fallback line: never a silent dense run.
    """

    _attention_backend = None
    _parallel_config = None
    #: lvsa's own context-parallel group (set by :class:`LVSAState` when lvsa shards the sequence)
    _lvsa_cp = None

    def __init__(self, engine, original):
        self.engine = engine
        self.original = original
        # keep what diffusers set on the original (attention backend, context parallelism),
        # so a sharded sequence is recognised and handed off instead of run as if whole
        for attr in ("_attention_backend", "_parallel_config"):
            val = getattr(original, attr, None)
            if val is not None:
                setattr(self, attr, val)

    def context_parallel(self):
        """``(cp, reason)``: the :class:`~lvsa.parallel.ContextParallel` this call runs under
        (``None`` without context parallelism), or a hand-off ``reason`` (diffusers' ring or
        ``*_anything`` modes, which the original processor implements)."""
        if self._lvsa_cp is not None:
            return self._lvsa_cp, None
        if self._parallel_config is not None:
            from ..parallel import from_diffusers
            return from_diffusers(self._parallel_config)
        return None, None

    def cp_check(self, cp, seq_len: int, text_len=0) -> None:
        """Under ``LVSA_CHECK=1``: once per generation, every rank must hold the same
        ``(T, P, L, step, offset, kfi)``; raises on disagreement. ``text_len`` may be a
        callable, evaluated only then (it can cost a device sync on every layer otherwise)."""
        if self.engine.config.check and self.engine.first_call_of_generation("cp_check"):
            L = text_len() if callable(text_len) else text_len
            cp.agree(self.engine.consistency_key(seq_len, L), "(T, P, L, step, offset, kfi)")

    def cp_video_attention(self, cp, q, k, v):
        """Video-only self-attention of local shards ``[B, S/w, H, D]`` under context
        parallelism; returns the local output ``[B, S/w, H, D]`` (exact)."""
        self.cp_check(cp, q.shape[1] * cp.world_size)

        def attend(q_, k_, v_, text_k, text_v, rows):
            return self.engine.attention(q_, k_, v_, text_k, text_v, q_rows=rows)
        return cp.attention(attend, q, k, v)

    def refuse_under_cp(self, cp, reason: str):
        """lvsa's own hooks shard the sequence over ``cp``'s ranks: the original processor
        would attend only the local shard, so a hand-off would be silently wrong. Say so instead."""
        from ..errors import ContextParallelError
        raise ContextParallelError(
            f"context parallel over {cp.world_size} ranks: this attention call needs the original processor "
            f"({reason}), which would attend only this rank's 1/{cp.world_size} of the tokens under lvsa's "
            "sequence split; run it without context_parallel, or use diffusers' enable_parallelism for this model")

    def delegate(self, reason: str, seq_len: int, *args, **kwargs):
        """Run the original processor (``args`` as it takes them: ``attn, hidden_states, …``), loudly."""
        if self._lvsa_cp is not None:
            self.refuse_under_cp(self._lvsa_cp, reason)
        self.engine.fallback(f"forward_{args[1].device.type}", reason, seq_len)
        for attr in ("_attention_backend", "_parallel_config"):
            val = getattr(self, attr, None)
            if val is not None:
                setattr(self.original, attr, val)
        return self.original(*args, **kwargs)


# -------------------------------------------------------------- the state
class LVSAState:
    """Everything :func:`lvsa.enable` changed on one pipeline (or bare transformer)."""

    def __init__(self, pipe, adapter: Adapter, engine, original_class):
        self.pipe = pipe
        self.adapter = adapter
        self.engine = engine
        self.original_class = original_class
        self.originals: List[Tuple[Any, Any]] = []  # (attention module, original processor)
        self.hooks: List[Any] = []
        self.riflex = None  # lvsa.integrations.riflex.Riflex when riflex=True
        self.last_summary: Optional[Dict[str, Any]] = None
        self.geometry_pending = False
        self._lock = threading.RLock()
        self._depth = 0

    # processors -----------------------------------------------------------
    def install(self):
        cp = self._context_parallel()
        for tr in transformers_of(self.pipe):
            mods = self.adapter.attention_modules(tr)
            if not mods:
                raise TypeError(f"lvsa found no self-attention processors to replace in {type(tr).__name__}")
            own_cp = cp is not None and getattr(tr, "_parallel_config", None) is None
            for _, mod in mods:
                orig = mod.processor
                proc = self.adapter.make_processor(self.engine, orig)
                if own_cp:
                    proc._lvsa_cp = cp
                mod.set_processor(proc)
                self.originals.append((mod, orig))
            self.hooks.append(tr.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            if self.engine.config.riflex:  # before the context-parallel split: RIFLEx sees whole tables
                from .riflex import install as install_riflex
                self.hooks.extend(install_riflex(self, tr))
            if own_cp:  # diffusers' enable_parallelism already splits: its group is used instead
                from ..parallel import install_hooks
                self.hooks.extend(install_hooks(tr, self.adapter.cp_plan, cp))

    def _context_parallel(self):
        """lvsa's own :class:`~lvsa.parallel.ContextParallel` when ``context_parallel`` is
        on and more than one rank runs, else ``None``."""
        mode = self.engine.config.context_parallel
        if mode == "off":
            return None
        from ..parallel import ContextParallel, group_world_size, is_initialized
        if not self.adapter.cp_plan:
            raise TypeError(f"lvsa has no context-parallel plan for {self.adapter.family}")
        if is_initialized() and group_world_size() == 1:
            return None  # one rank: nothing to split
        return ContextParallel(group=None, mode=mode)

    def uninstall(self):
        for mod, orig in reversed(self.originals):
            mod.set_processor(orig)
        self.originals.clear()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def _pre_forward(self, module, args, kwargs):
        # Geometry from the transformer's input: on the first forward for pipelines whose
        # call arguments the adapter cannot read (image-to-video variants, custom
        # pipelines), and on every forward of a bare transformer (no pipeline call to read).
        if not self.geometry_pending and is_pipeline(self.pipe):
            return None
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs is not None and getattr(hs, "dim", lambda: 0)() == 5:
            f = self.adapter.factors(None if not hasattr(self.pipe, "vae") else self.pipe.vae.config, module.config)
            T, P = self.adapter.latent_tokens(hs.shape, f)
            self.set_geometry(T, P)
            self.geometry_pending = False
        return None

    def set_geometry(self, T: Optional[int], P: Optional[int]):
        known = self.adapter.known_reference(self.pipe)
        self.engine.set_geometry(patches_per_frame=P, latent_frames=T, reference=known,
                                 known_reference=known)

    # a pipeline call -------------------------------------------------------
    def run(self, call: Callable, pipe, args, kwargs):
        with self._lock:
            self._depth += 1
            nested = self._depth > 1
        try:
            if nested:  # a pipeline calling itself: one generation
                return call(pipe, *args, **kwargs)
            geo = None
            bound = None
            try:
                bound = inspect.signature(call).bind(pipe, *args, **kwargs)
                bound.apply_defaults()
                geo = self.adapter.call_geometry(pipe, dict(bound.arguments))
            except (TypeError, ValueError, AttributeError, KeyError):
                geo = None
            if geo is not None:
                self.set_geometry(*geo)
                self.geometry_pending = False
            else:
                self.geometry_pending = True
            self.engine.begin_generation()
            replaced = [type(m.processor).__name__ for m, _ in self.originals
                        if not isinstance(m.processor, ProcessorBase)]
            if replaced:
                self.engine.fallback("pipeline", "processors_replaced", 0, count=len(replaced),
                                     now=replaced[0], fix="call lvsa.enable(pipe) again after "
                                     "fuse_qkv_projections()/set_attn_processor()")
            if bound is not None and "callback_on_step_end" in bound.arguments:
                # the pipeline's own step callback tells the engine which step comes next
                # (chained in front of the user's callback, if any)
                restore = _chain_step_callback(bound, self.engine)
                args, kwargs = bound.args[1:], bound.kwargs
            else:  # pipelines without one (HunyuanVideo 1.5): the scheduler's step
                restore = wrap_scheduler_step(getattr(pipe, "scheduler", None), self.engine)
            try:
                return call(pipe, *args, **kwargs)
            finally:
                restore()
                self.last_summary = self.engine.end_generation()
                s = self.last_summary
                if not replaced and s["sparse_calls"] + s["dense_calls"] + s["fallbacks"] == 0:
                    self.engine.fallback("pipeline", "lvsa_not_called", 0,
                                         fix="no attention call reached lvsa in this generation")
                    self.last_summary = self.engine.end_generation()
                if self.riflex is not None:
                    self.last_summary["riflex"] = self.riflex.summary()
        finally:
            with self._lock:
                self._depth -= 1


def _chain_step_callback(bound, engine) -> Callable[[], None]:
    """Put an engine-stepping callback in front of the user's ``callback_on_step_end``."""
    user_cb = bound.arguments.get("callback_on_step_end")
    tensor_inputs = getattr(user_cb, "tensor_inputs", None)
    if tensor_inputs is not None and "callback_on_step_end_tensor_inputs" in bound.arguments:
        # diffusers reads a PipelineCallback's tensor inputs itself; our wrapper hides the
        # object, so pass them on explicitly
        bound.arguments["callback_on_step_end_tensor_inputs"] = list(tensor_inputs)
    engine.set_step(0)

    def lvsa_step_callback(pipe, i, t, callback_kwargs):
        engine.set_step(int(i) + 1)
        return user_cb(pipe, i, t, callback_kwargs) if user_cb is not None else callback_kwargs

    bound.arguments["callback_on_step_end"] = lvsa_step_callback
    return lambda: None


def wrap_scheduler_step(scheduler, engine) -> Callable[[], None]:
    """Make ``scheduler.step`` tell the engine which step comes next; returns the undo."""
    if scheduler is None or not hasattr(scheduler, "step"):
        return lambda: None
    had_own = "step" in vars(scheduler)
    original = scheduler.step
    done = [0]
    engine.set_step(0)

    @functools.wraps(original)  # keeps the signature: pipelines inspect it for eta/generator
    def step(*a, **kw):
        out = original(*a, **kw)
        done[0] += 1
        engine.set_step(done[0])
        return out

    scheduler.step = step

    def restore():
        if had_own:
            scheduler.step = original
        else:
            try:
                del scheduler.step
            except AttributeError:
                pass
    return restore


# ---------------------------------------------------------- class wrapper
_WRAPPED: Dict[type, type] = {}


def lvsa_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` runs through the pipeline's :class:`LVSAState`."""
    if getattr(cls, "_lvsa_original_class", None) is not None:
        return cls
    if cls not in _WRAPPED:
        original_call = cls.__call__

        @functools.wraps(original_call)
        def __call__(self, *args, **kwargs):
            state = self.__dict__.get(STATE_ATTR)
            if state is None:
                return original_call(self, *args, **kwargs)
            return state.run(original_call, self, args, kwargs)

        _WRAPPED[cls] = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "_lvsa_original_class": cls})
    return _WRAPPED[cls]


def is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and hasattr(obj, "register_modules")
