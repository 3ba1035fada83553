"""``lvsa bench model``: one denoising step of a real video transformer, dense vs lvsa.

For each model (:mod:`lvsa.bench.specs`: Wan 2.1 1.3B / 14B, HunyuanVideo 1.5 480p,
CogVideoX 5B — the real diffusers class at real size, random weights, no download; or a
local checkpoint with ``--model-dir``), each latent frame count and each batch (1, and 2
as with classifier-free guidance batched), one transformer forward is timed for:

* ``diffusers`` — diffusers' own attention processors, as a user gets them (for
  HunyuanVideo 1.5 that path attends with an S x S padding mask);
* ``dense`` — the *best dense* baseline: lvsa's processor at full density (no S x S mask,
  valid text keys merged) on the fastest dense kernel of the card, probed per row: SDPA's
  cuDNN or FlashAttention-2, or FlashAttention-4's dense forward where the ``fa4`` backend
  can run (the record's ``dense_kernel``; ``dense_kernels_ms`` has every candidate's time
  or why it was not one);
* one row per lvsa backend (``flashinfer``, ``triton``, ``reference``, ``ascend`` … every
  backend that can run the problem, or ``--backends``).

Self-attention time is measured inside the forward (device events around every
self-attention call, outermost only), so each row reports the split *attention vs the
rest* and the **ceiling** for its mask: ``non-attention time + dense attention time x
density`` (from the ``dense`` baseline), and each lvsa backend's ratio to it. An
out-of-memory is a result (``OOM``) and the run goes on.

With ``--world-size N`` (re-launched under ``torchrun``) or when started by ``torchrun``,
every rank runs the model with context parallelism: lvsa's own
(``lvsa.enable(transformer, context_parallel=…)``) and, as the dense baseline, diffusers'
Ulysses (``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``, Wan only in
diffusers 0.42). Each row then also reports the speedup over 1-GPU lvsa, the parallel
efficiency, the share of the step spent in NCCL kernels (torch.profiler) and the peak
memory per GPU (NVML).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import dispatch
from . import common, kernels
from . import rows as row_merge
from .rows import BASELINES, summarize_row
from .specs import FULL, QUICK, SPECS, ModelSpec, get_spec, spec_from_dir


# --------------------------------------------------------------------- building
def _diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"lvsa bench model needs diffusers ({e}); pip install 'lvsa[diffusers]'") from None
    return diffusers


def _has_weights(d: str) -> bool:
    return any(f.endswith((".safetensors", ".bin")) for f in os.listdir(d))


def build_transformer(spec: ModelSpec, device, dtype, weights_dir: Optional[str] = None):
    """The diffusers transformer of ``spec`` on ``device``: the checkpoint's weights when
    ``weights_dir`` holds them, else random weights built on the device (parameters in
    ``dtype`` except the class's ``_keep_in_fp32_modules``, as ``from_pretrained`` does)."""
    diffusers = _diffusers()
    cls = getattr(diffusers, spec.class_name)
    if weights_dir and _has_weights(weights_dir):
        tr = cls.from_pretrained(weights_dir, torch_dtype=dtype).to(device)
    else:
        with torch.device(device):
            tr = cls.from_config(dict(spec.config))
        keep = list(getattr(cls, "_keep_in_fp32_modules", None) or [])
        for name, p in tr.named_parameters():
            if p.is_floating_point() and not any(m in name.split(".") for m in keep):
                p.data = p.data.to(dtype)
    return tr.eval().requires_grad_(False)


def blocks_attr(spec: ModelSpec) -> str:
    return "blocks" if spec.family == "wan" else "transformer_blocks"


@contextlib.contextmanager
def one_block(tr, spec: ModelSpec):
    """The transformer with only its first block (a warm-up that compiles, plans and
    picks kernels for every shape of the real forward, at 1/L of its cost)."""
    attr = blocks_attr(spec)
    full = getattr(tr, attr)
    setattr(tr, attr, torch.nn.ModuleList(list(full)[:1]))
    try:
        yield
    finally:
        setattr(tr, attr, full)


def make_inputs(spec: ModelSpec, tr, T: int, batch: int, device, dtype, seed: int = 0) -> Dict[str, Any]:
    """The keyword arguments of the transformer's forward for one denoising step at ``T``
    latent frames, as the pipeline builds them (text-to-video; random latents/embeddings)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    lh, lw = spec.latent_hw
    pt = spec.patch[0]
    c = spec.in_channels
    tx = spec.text

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dt)

    if spec.family == "wan":
        kw = dict(hidden_states=rnd(batch, c, T * pt, lh, lw),
                  timestep=torch.full((batch,), 500.0, device=dev),
                  encoder_hidden_states=rnd(batch, tx["len"], tx["dim"]))
        if spec.config.get("image_dim"):
            kw["encoder_hidden_states_image"] = rnd(batch, 257, spec.config["image_dim"])
        return kw
    if spec.family == "hunyuan":
        mask = torch.zeros(batch, tx["len"], dtype=torch.int64, device=dev)
        mask[:, :tx["valid"]] = 1
        mask2 = torch.zeros(batch, tx["len_2"], dtype=torch.int64, device=dev)
        mask2[:, :tx["valid_2"]] = 1
        return dict(hidden_states=rnd(batch, c, T * pt, lh, lw),
                    timestep=torch.full((batch,), 500.0, device=dev, dtype=dtype),
                    encoder_hidden_states=rnd(batch, tx["len"], tx["dim"]), encoder_attention_mask=mask,
                    encoder_hidden_states_2=rnd(batch, tx["len_2"], tx["dim_2"]), encoder_attention_mask_2=mask2,
                    image_embeds=torch.zeros(batch, tx["image_len"], tx["image_dim"], device=dev, dtype=dtype))
    # CogVideoX: latents [B, F, C, H, W]; RoPE from the pipeline's own helper
    from diffusers import CogVideoXPipeline

    kw = dict(hidden_states=rnd(batch, T * pt, c, lh, lw), encoder_hidden_states=rnd(batch, tx["len"], tx["dim"]),
              timestep=torch.full((batch,), 500, device=dev, dtype=torch.long))
    if spec.config.get("use_rotary_positional_embeddings"):
        helper = types.SimpleNamespace(transformer=tr, vae_scale_factor_spatial=spec.vae_spatial)
        kw["image_rotary_emb"] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            helper, spec.height, spec.width, T * pt, dev)
    return kw


# ------------------------------------------------------------- attention split
def _self_attention_targets(video_tokens: int):
    """``(obj, attr, key_seq_dim)`` of every function through which self-attention runs."""
    import importlib

    import torch.nn.functional as F

    targets = [(F, "scaled_dot_product_attention", -2)]
    for mod in ("diffusers.models.attention_dispatch", "diffusers.models.transformers.transformer_wan",
                "diffusers.models.transformers.transformer_hunyuan_video15",
                "diffusers.models.transformers.cogvideox_transformer_3d"):
        try:
            targets.append((importlib.import_module(mod), "dispatch_attention_fn", 1))
        except ImportError:
            pass
    return targets


@contextlib.contextmanager
def time_self_attention(timer: common.RegionTimer, video_tokens: int, engine=None):
    """Time every self-attention call: lvsa's ``Engine.attention`` and every dense call
    whose keys span at least the video (cross-attention to text and the text refiner are
    left out: they are part of "the rest")."""
    def guarded(seq_dim):
        def wrap(fn):
            timed = timer.wrap(fn)

            def call(*a, **kw):
                key = kw.get("key", a[1] if len(a) > 1 else None)
                if isinstance(key, torch.Tensor) and key.dim() >= 3 and key.shape[seq_dim] >= video_tokens:
                    return timed(*a, **kw)
                return fn(*a, **kw)
            return call
        return wrap

    with contextlib.ExitStack() as stack:
        for obj, attr, dim in _self_attention_targets(video_tokens):
            stack.enter_context(common.patched([(obj, attr)], guarded(dim)))
        if engine is not None:
            stack.enter_context(common.patched([(engine, "attention")], timer.wrap))
        yield


# --------------------------------------------------------------- dense kernels
def probe_dense_kernels(spec: ModelSpec, T: int, batch: int, device, dtype) -> Dict[str, Any]:
    """Time one dense self-attention call of this row's shape (``[B, S, H, D]`` tensors,
    as lvsa's processor passes them) on each fast dense kernel (:mod:`lvsa.bench.kernels`,
    the names ``bench attention --dense`` uses): SDPA's ``cudnn`` and ``fa2`` on CUDA, and
    FlashAttention-4's dense forward ``fa4`` wherever the ``fa4`` backend says it can run.
    Returns ``ms`` (each kernel's time, or why it did not run: ``n/a: <the fa4 backend's
    reasons>``, an error), ``fastest`` (the fastest's name; ``None`` when nothing was
    timed), ``order`` (SDPA's kernels, fastest first, for every SDPA call of the row), ``fa4`` (FA4's dense function when it is the fastest:
    lvsa's dense calls then run through it, :func:`dense_kernel`) and ``fa4_why`` (why FA4
    cannot run here; in ``ms`` too on a CUDA GPU, where it is a candidate worth naming)."""
    dev = torch.device(device)
    S = T * spec.tokens_per_frame + spec.joint_text_tokens
    H, D = spec.heads, spec.head_dim
    sdpa = dev.type == "cuda"
    fa4, why = common.fa4_dense(dev, dtype, batch, S, H, H, D)
    # why FA4 is no candidate is worth a line on a CUDA GPU only (not on a CPU or an NPU)
    ms: Dict[str, Any] = {} if fa4 is not None or not sdpa else {"fa4": "n/a: " + "; ".join(why)}
    if not sdpa and fa4 is None:
        return {"order": None, "fastest": None, "ms": ms, "fa4": None, "fa4_fn": None, "sdpa": False,
                "fa4_why": why}
    q = torch.randn(batch, S, H, D, device=dev, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    calls = {n: kernels.sdpa_call(n, q, k, v) for n in kernels.SDPA_FORCED} if sdpa else {}
    if fa4 is not None:
        calls["fa4"] = functools.partial(fa4, q, k, v)
    for name, call in calls.items():
        try:
            ms[name] = common.device_time_ms(call, dev, 1, 1)
        except Exception as ex:  # noqa: BLE001 - a kernel this card/shape lacks
            ms[name] = f"{type(ex).__name__}: {str(ex)[:120]}"
    del q, k, v, calls
    common.free_memory(dev)
    fastest, order = choose_dense(ms, sdpa)
    return {"order": order, "fastest": fastest, "ms": ms, "fa4": fa4 if fastest == "fa4" else None,
            "fa4_fn": fa4, "sdpa": sdpa, "fa4_why": why}


def agree_dense(ctx, probe: Dict[str, Any]) -> Dict[str, Any]:
    """Under ``--world-size N``: every rank's best dense row on the same kernel, rank 0's
    choice (each rank probes on its own with one timed call per kernel, and ranks could
    pick different kernels). FA4 is kept only if every rank can run it. One process:
    ``probe`` unchanged."""
    world = getattr(ctx, "world", 1) if ctx is not None else 1
    if world <= 1:
        return probe
    import torch.distributed as dist

    everyone = [None] * world
    dist.all_gather_object(everyone, probe.get("fa4_fn") is not None)
    box = [dict(probe["ms"])]
    dist.broadcast_object_list(box, src=0)
    ms = box[0]
    if not all(everyone) and isinstance(ms.get("fa4"), (int, float)):
        ms["fa4"] = "n/a: not every rank can run FlashAttention-4's dense forward"
    fastest, order = choose_dense(ms, probe.get("sdpa", True))
    return dict(probe, ms=ms, fastest=fastest, order=order,
                fa4=probe.get("fa4_fn") if fastest == "fa4" else None)


def choose_dense(ms: Dict[str, Any], sdpa: bool = True):
    """``(fastest, order)`` from the probe's times ``ms`` (a kernel's milliseconds, or a
    string: why it did not run): the fastest timed kernel (``None``: none was timed) and,
    with ``sdpa``, SDPA's priority list: its timed kernels fastest first, then the others."""
    return kernels.fastest(ms), (kernels.sdpa_order(ms) if sdpa else None)


@contextlib.contextmanager
def dense_kernel(probe: Optional[Dict[str, Any]]):
    """The kernels of the *best dense* row (``probe``: :func:`probe_dense_kernels`):
    SDPA's kernels in ``order`` and, when FlashAttention-4's dense forward was the fastest,
    lvsa's dense calls routed to it (:func:`lvsa.ops.dense_kernel`: the full-density path
    of the engine; the processors' other SDPA calls, e.g. HunyuanVideo's text queries,
    keep SDPA's fastest kernel)."""
    from .. import ops

    probe = probe or {}
    with contextlib.ExitStack() as stack:
        if probe.get("order"):
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(probe["order"], set_priority=True))
        if probe.get("fa4") is not None:
            stack.enter_context(ops.dense_kernel(probe["fa4"]))
        yield


# ------------------------------------------------------------------- geometry
def row_geometry(spec: ModelSpec, T: int) -> Dict[str, Any]:
    """Tokens, the mask lvsa uses at step 0 and the attended fraction of the joint
    (video + valid text) self-attention."""
    from ..engine import Engine

    P = spec.tokens_per_frame
    L = spec.joint_text_tokens
    eng = Engine(family=spec.family)
    mask = eng.schedule(T, P).mask_for_step(0)
    S = T * P
    pairs = mask.nnz() * P * P + S * L + L * (S + L)  # video->video (mask), video->text, text->all
    density = pairs / float((S + L) ** 2)
    return {"T": T, "P": P, "video_tokens": S, "text_tokens": L, "tokens": S + L,
            "video_frames": spec.video_frames(T), "kfi": mask.key_frame_interval,
            "mask_density": mask.density(), "density": density, "dense_by_design": mask.is_dense}


# ------------------------------------------------------------------- variants
class Context:
    """What one model's runs share."""

    def __init__(self, spec, tr, device, dtype, args, dist_info=None):
        self.spec, self.tr, self.device, self.dtype, self.args = spec, tr, torch.device(device), dtype, args
        self.dist = dist_info
        self.world = dist_info.world_size if dist_info else 1

    def forward(self, inputs):
        with torch.inference_mode():
            out = self.tr(**inputs, return_dict=False)[0]
        return out


def _lvsa_settings(variant: str, T: int, spec: ModelSpec, cp: Optional[str]) -> Dict[str, Any]:
    s: Dict[str, Any] = {"strict": True, "check": False, "warn_fallback": True}
    if variant == "dense":
        # full density: a budget scale large enough that every frame is global (kfi = 1)
        s["sparsity_scale"] = float(max(2, math.ceil(T / spec.reference) + 1))
    else:
        s["backend"] = variant
    if cp:
        s["context_parallel"] = cp
    return s


@contextlib.contextmanager
def installed(ctx: Context, variant: str, T: int, cp: Optional[str] = None, diffusers_cp: bool = False):
    """The transformer set up for ``variant`` (lvsa enabled or not, context parallelism)."""
    from .. import integrations

    tr = ctx.tr
    if variant == "diffusers":
        if diffusers_cp:
            from diffusers import ContextParallelConfig

            with contextlib.ExitStack() as stack:
                if ctx.device.type == "cpu":
                    # diffusers 0.42 places rank r on device r % torch.accelerator.device_count(),
                    # which divides by zero without an accelerator: one CPU "device" per rank
                    stack.enter_context(common.patched([(torch.accelerator, "device_count")],
                                                       lambda fn: (lambda *a, **k: 1)))
                tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ctx.world))
        try:
            yield None
        finally:
            if diffusers_cp:
                _undo_diffusers_cp(tr)
        return
    integrations.enable(tr, **_lvsa_settings(variant, T, ctx.spec, cp))
    try:
        yield integrations.engine_of(tr)
    finally:
        integrations.disable(tr)


def _undo_diffusers_cp(tr):
    from diffusers.hooks.context_parallel import remove_context_parallel

    remove_context_parallel(tr, tr._cp_plan)
    tr._parallel_config = None
    for m in tr.modules():
        proc = getattr(m, "processor", None)
        if proc is not None and getattr(proc, "_parallel_config", None) is not None:
            proc._parallel_config = None


def _nccl_time_s(prof) -> float:
    total = 0.0
    for evt in prof.key_averages():
        if "nccl" in evt.key.lower():
            t = getattr(evt, "device_time_total", None)
            if t is None:
                t = getattr(evt, "cuda_time_total", 0.0)
            total += float(t)
    return total / 1e6


def run_variant(ctx: Context, variant: str, T: int, inputs, dense, cp: Optional[str] = None,
                diffusers_cp: bool = False) -> Dict[str, Any]:
    """Warm up (one block), then time full forwards; never raises (OOM and errors are results)."""
    args = ctx.args
    res: Dict[str, Any] = {"variant": variant}
    if cp:
        res["context_parallel"] = cp
    timer = common.RegionTimer(ctx.device)
    video_tokens = T * ctx.spec.tokens_per_frame
    local_tokens = video_tokens // ctx.world if (cp or diffusers_cp) and ctx.world > 1 else video_tokens
    try:
        with installed(ctx, variant, T, cp, diffusers_cp) as engine, \
                dense_kernel(dense if variant == "dense" else None):
            t0 = time.perf_counter()
            compiled_before = dispatch.compile_times()
            with time_self_attention(timer, local_tokens, engine), one_block(ctx.tr, ctx.spec):
                for _ in range(args.warmup):
                    ctx.forward(inputs)
            common.synchronize(ctx.device)
            res["warmup_s"] = time.perf_counter() - t0
            cold = {f"{b} {key}": s for (b, key), s in dispatch.compile_times().items()
                    if (b, key) not in compiled_before}
            if cold:  # first use of a compiling backend in this process: its cold start
                res["cold_start_s"] = cold
            samples, attn = [], []
            mem = common.MemoryPeak(ctx.device)
            t_start = time.perf_counter()
            with time_self_attention(timer, local_tokens, engine):
                for i in range(args.repeats):
                    if engine is not None:
                        engine.begin_generation(announce=(i == 0))
                    timer.reset()
                    _barrier(ctx)
                    with (mem if i == 0 else contextlib.nullcontext()):
                        common.synchronize(ctx.device)
                        t = time.perf_counter()
                        out = ctx.forward(inputs)
                        common.synchronize(ctx.device)
                        samples.append(time.perf_counter() - t)
                    attn.append(timer.total_s())
                    if i == 0:
                        res["attention_calls"] = timer.calls
                        res["output_finite"] = bool(torch.isfinite(out).all())
                    del out
                    stop = len(samples) >= args.min_repeats and time.perf_counter() - t_start >= args.max_time
                    if _agree(ctx, stop):  # every rank must run the same forwards (collectives)
                        break
                if engine is not None:
                    s = engine.end_generation()
                    res["lvsa"] = {k: s[k] for k in ("backend", "sparse_calls", "dense_calls", "fallbacks",
                                                     "fallbacks_by_reason")}
                if ctx.world > 1 and ctx.device.type == "cuda" and args.profile_comm and variant not in BASELINES:
                    res["comm"] = _profile_comm(ctx, inputs, engine)
            res.update(samples_s=samples, attention_s=attn, time_s=common.median(samples),
                       attention_time_s=common.median(attn), **mem.as_dict())
            res["rest_time_s"] = res["time_s"] - res["attention_time_s"]
            if res.get("comm"):
                res["comm_share"] = res["comm"]["nccl_s"] / res["comm"]["forward_s"]
    except Exception as e:  # noqa: BLE001 - one failure is a result, the run goes on
        res["error"] = "OOM" if common.is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        common.free_memory(ctx.device)
    if ctx.world > 1:
        # every rank's peak memory and outcome (rank 0 writes the results); a failure on
        # any rank fails the variant everywhere, so the ranks stay in step
        import torch.distributed as dist

        per_rank = [None] * ctx.world
        dist.all_gather_object(per_rank, {"error": res.get("error"),
                                          **({k: res.get(k) for k in ("peak_alloc_gib", "peak_reserved_gib",
                                                                      "nvml_peak_used_gib")})})
        res["per_rank_memory"] = per_rank
        bad = [(r, x["error"]) for r, x in enumerate(per_rank) if x["error"]]
        if bad and not res.get("error"):
            res["error"] = f"rank {bad[0][0]}: {bad[0][1]}"
    return res


def _agree(ctx, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (one process: ``flag``); ``ctx`` is a
    :class:`Context` or the distributed info (``None``: one process)."""
    world = getattr(ctx, "world", None) or getattr(ctx, "world_size", 1) if ctx is not None else 1
    if world <= 1:
        return flag
    import torch.distributed as dist

    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _barrier(ctx: Context):
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _profile_comm(ctx: Context, inputs, engine) -> Dict[str, float]:
    """One extra forward under torch.profiler: time in NCCL kernels vs the forward."""
    from torch.profiler import ProfilerActivity, profile

    if engine is not None:
        engine.begin_generation(announce=False)
    _barrier(ctx)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        common.synchronize(ctx.device)
        t = time.perf_counter()
        out = ctx.forward(inputs)
        common.synchronize(ctx.device)
        fwd = time.perf_counter() - t
    del out
    if engine is not None:
        engine.end_generation()
    return {"nccl_s": _nccl_time_s(prof), "forward_s": fwd}


# ----------------------------------------------------------------------- rows
def lvsa_backends(spec: ModelSpec, device, dtype, T: int, batch: int, wanted: Optional[Sequence[str]]):
    """``(run, refused)``: the backends to time for this row and why the others cannot."""
    from .. import plugins
    from ..backend import Problem

    dev = torch.device(device)
    cc = None
    if dev.type == "cuda" and torch.cuda.is_available():
        cc = torch.cuda.get_device_capability(dev.index or 0)
    g = row_geometry(spec, T)
    problem = Problem(device_kind=dev.type, dtype=dtype, batch=batch, seq_len=g["video_tokens"],
                      num_heads=spec.heads, num_kv_heads=spec.heads, head_dim=spec.head_dim,
                      text_len=g["text_tokens"], T=T, P=g["P"], compute_capability=cc,
                      device_index=dev.index)
    regs = plugins.backends()
    names = list(wanted) if wanted else sorted(regs)
    run, refused = [], {}
    for n in names:
        bk = regs.get(n)
        if bk is None:
            refused[n] = [f"not installed (registered: {', '.join(sorted(regs))})"]
            continue
        check = getattr(bk, "not_supported_reasons", None) or bk.supports
        why = list(check(problem))
        if why:
            refused[n] = why
        else:
            run.append(n)
    order = {"triton": 0, "flashinfer": 1, "ascend": 2, "reference": 9}
    return sorted(run, key=lambda n: order.get(n, 5)), refused


# ------------------------------------------------------------------ estimates
def estimate_forward_s(spec: ModelSpec, T: int, batch: int, density: float = 1.0,
                       linear_tflops: float = 500.0, attention_tflops: float = 450.0) -> float:
    """A rough time of one forward from its FLOPs (for the time budget; H200-like rates)."""
    P, L = spec.tokens_per_frame, spec.joint_text_tokens
    S = T * P + L
    hid = spec.heads * spec.head_dim
    ffn = spec.config.get("ffn_dim") or int(hid * spec.config.get("mlp_ratio", 4.0))
    per_token = 2 * (4 * hid * hid + 2 * hid * ffn) * (1.5 if spec.family == "wan" else 1.0)  # + cross-attn
    lin = per_token * S * spec.layers * batch
    att = 4.0 * S * S * hid * spec.layers * batch * density
    return lin / (linear_tflops * 1e12) + att / (attention_tflops * 1e12)


# ---------------------------------------------------------------------- output
def markdown(meta: Dict[str, Any], records: List[Dict[str, Any]]) -> str:
    dev = common.describe_device(meta["device_before"])
    world = meta.get("world_size", 1)
    lines = [f"# lvsa model benchmark — {dev}", "",
             f"- date: {meta['date']}; command: `{meta['command']}`",
             f"- lvsa {meta['versions']['lvsa']}, torch {meta['versions']['torch']} (CUDA {meta['versions']['cuda']}), "
             f"diffusers {meta['versions']['diffusers']}, triton {meta['versions']['triton']}, "
             f"flashinfer {meta['versions']['flashinfer']}; {meta['dtype']}; world size {world}",
             f"- one transformer forward (one denoising step), random weights, real size; median of up to "
             f"{meta['repeats']} timed forwards after {meta['warmup']} one-block warm-up(s). `diffusers` = "
             "diffusers' own attention; `dense` = lvsa's processor at full density on the fastest dense "
             "kernel (no S x S mask): the best dense baseline. ceiling = rest + dense attention x density; "
             "of ceiling = ceiling / time.", ""]
    head = ("| model | T_lat (frames) | B | tokens | density | diffusers s | dense s | attn share | backend | "
            "lvsa s | vs dense | vs diffusers | ceiling x | of ceiling | peak GiB dense / lvsa |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    if world > 1:
        head += " vs 1 GPU | efficiency | comm share |"
        sep += "---|---|---|"
    lines += [head, sep]

    def t(r):
        if r is None:
            return "not run"
        if r.get("error"):
            return r["error"] if r["error"] == "OOM" else "n/a" if r["error"].startswith("n/a") else "error"
        return common.fmt(r.get("time_s"), ".3f")

    for rec in records:
        V = rec["variants"]
        names = [n for n in V if n not in BASELINES] or ["—"]
        mark = "†" if rec.get("dense_baseline") == "diffusers" else ""
        for n in names:
            r = V.get(n, {})
            row = (f"| {rec['title']} | {rec['T']} ({rec['video_frames']}) | {rec['batch']} | {rec['tokens']} "
                   f"| {rec['density']:.3f} | {t(V.get('diffusers'))} | {t(V.get('dense'))} "
                   f"| {common.fmt(rec.get('dense_attention_share'))} | {n} | {t(r)} "
                   f"| {common.fmt(r.get('speedup_vs_dense'))}x{mark} | {common.fmt(r.get('speedup_vs_diffusers'))}x "
                   f"| {common.fmt(rec.get('ceiling_speedup'))}x{mark} | {common.fmt(r.get('of_ceiling'))} "
                   f"| {common.fmt(V.get(rec.get('dense_baseline') or 'dense', {}).get('peak_alloc_gib'), '.1f')}{mark} / "
                   f"{common.fmt(r.get('peak_alloc_gib'), '.1f')} |")
            if world > 1:
                row += (f" {common.fmt(r.get('speedup_vs_1gpu'))}x | {common.fmt(r.get('parallel_efficiency'))} "
                        f"| {common.fmt(r.get('comm_share'))} |")
            lines.append(row)
    ran = meta.get("baselines", BASELINES)
    not_run = [b for b in BASELINES if b not in ran]
    if not_run:
        lines += ["", f"Baselines not run (`--baselines {' '.join(ran) or 'none'}`): {', '.join(not_run)}."
                  + (" † = against diffusers' own attention (speedup, ceiling and the baseline's peak memory): the "
                     "best dense was not run."
                     if "dense" in not_run and "diffusers" in ran else "")]
    errs = [(rec, n, r["error"]) for rec in records for n, r in rec["variants"].items()
            if r.get("error") and r["error"] != "OOM" and not r["error"].startswith("n/a")]
    na = sorted({f"{rec['title']} {n}: {r['error'][5:]}" for rec in records for n, r in rec["variants"].items()
                 if (r.get("error") or "").startswith("n/a")})
    ooms = [(rec, n) for rec in records for n, r in rec["variants"].items() if r.get("error") == "OOM"]
    if ooms:
        lines += ["", "Out of memory: " + "; ".join(f"{rec['title']} T{rec['T']} B{rec['batch']} {n}"
                                                   for rec, n in ooms) + "."]
    saved = [(rec, n) for rec in records for n in rec.get("dense_oom_lvsa_not", [])]
    if saved:
        lines += ["", "Dense ran out of memory where lvsa did not: " + "; ".join(
            f"{rec['title']} T{rec['T']} B{rec['batch']} ({n})" for rec, n in saved) + "."]
    cold = [f"{rec['title']} T{rec['T']} B{rec['batch']} {k} {s:.1f}s" for rec in records
            for r in rec["variants"].values() for k, s in r.get("cold_start_s", {}).items()]
    if cold:
        lines += ["", "Cold starts (first use of a compiling backend in the process, compile included): "
                  + "; ".join(cold) + "."]
    if na:
        lines += ["", "Not available:"] + [f"- {x}" for x in na]
    if errs:
        lines += ["", "Errors:"] + [f"- {rec['title']} T{rec['T']} B{rec['batch']} {n}: {e}" for rec, n, e in errs]
    lines += dense_kernel_lines(records)
    refused = {(rec["title"], n): "; ".join(w) for rec in records for n, w in rec.get("refused", {}).items()}
    if refused:
        lines += ["", "Backends not run:"] + [f"- {m} {n}: {w}" for (m, n), w in refused.items()]
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", "Skipped (time budget): " + ", ".join(skipped) + "."]
    after = meta.get("device_after") or {}
    g0 = (meta["device_before"].get("gpus") or [{}])[0]
    g1 = (after.get("gpus") or [{}])[0]
    if g0 or g1:
        lines += ["", f"GPU state before / after: SM clock {g0.get('sm_clock_mhz')} / {g1.get('sm_clock_mhz')} MHz, "
                      f"power {common.fmt(g0.get('power_w'), '.0f')} / {common.fmt(g1.get('power_w'), '.0f')} W, "
                      f"throttle {g0.get('throttle_reasons')} / {g1.get('throttle_reasons')}."]
    notes = meta["device_before"].get("notes") or []
    if notes:
        lines += ["", "Device record notes: " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


def dense_kernel_lines(records: List[Dict[str, Any]]) -> List[str]:
    """Which dense kernel the *best dense* row of each record ran on and the probe's times
    (every candidate, or why it was not one)."""
    rows, why = [], {}
    for rec in records:
        ms = rec.get("dense_kernels_ms") or {}
        timed = sorted((t, n) for n, t in ms.items() if isinstance(t, (int, float)))
        for n, t in ms.items():
            if isinstance(t, str):
                why.setdefault(f"{kernels.canonical(n)}: {t[5:] if t.startswith('n/a: ') else t}", []).append(
                    f"{rec['title']} T{rec['T']} B{rec['batch']}")
        if rec.get("dense_kernel") or timed:
            best = rec.get("dense_kernel")
            rows.append(f"- {rec['title']} T{rec['T']} B{rec['batch']}: "
                        f"{kernels.prose(best) or 'none timed'} ("
                        + ", ".join(f"{kernels.canonical(n)} {t:.2f} ms" for t, n in timed) + ")")
    if not rows and not why or not any("dense" in (rec.get("variants") or {}) for rec in records):
        return []   # nothing probed, or no row ran the best dense baseline
    out = ["", "Best dense kernel per row (`dense` ran on the fastest of one timed dense self-attention call "
               "per kernel):" if rows else "Best dense kernel: none was timed, `dense` ran on the default SDPA:"]
    out += rows
    every = len(records)
    out += [f"- not a candidate ({'every row' if len(v) == every else '; '.join(v)}): {k}" for k, v in why.items()]
    return out


def plot(base: str, records: List[Dict[str, Any]]) -> List[str]:
    """``<base>-time.png`` (forward time vs latent frames per variant) and
    ``<base>-speedup.png`` (speedup over the best dense baseline, the ceiling drawn)."""
    plt = common.pyplot()
    models = list(dict.fromkeys(r["title"] for r in records))
    files = []
    for what in ("time", "speedup"):
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
        for ax, m in zip(axes[0], models):
            rows = [r for r in records if r["title"] == m]
            for b in sorted({r["batch"] for r in rows}):
                rb = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["T"])
                style = "-" if b == 1 else "--"
                names = list(dict.fromkeys(n for r in rb for n in r["variants"]))
                for n in names:
                    pts = [(r["T"], r["variants"][n]) for r in rb if r["variants"].get(n, {}).get("time_s")]
                    if what == "time":
                        ax.plot([p[0] for p in pts], [p[1]["time_s"] for p in pts], style, marker="o",
                                label=f"{n} B{b}")
                    elif n not in BASELINES:
                        pts = [(T, r["speedup_vs_dense"]) for T, r in pts if r.get("speedup_vs_dense")]
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{n} B{b}")
                if what == "speedup":
                    pts = [(r["T"], r["ceiling_speedup"]) for r in rb if r.get("ceiling_speedup")]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="x", color="black", alpha=0.6,
                            label=f"ceiling B{b}")
            ax.set_title(m)
            ax.set_xlabel("latent frames")
            ax.set_ylabel("seconds per forward" if what == "time" else "speedup over best dense")
            if what == "speedup":
                ax.axhline(1.0, color="grey", lw=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{base}-{what}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def compare_entries(data: Dict[str, Any]) -> Dict[Tuple, Any]:
    out = {}
    for rec in data["records"]:
        for n, r in rec.get("variants", {}).items():
            out[(rec.get("model"), f"T{rec.get('T')}", f"B{rec.get('batch')}", f"w{rec.get('world_size', 1)}", n)] = \
                r.get("time_s") if r.get("time_s") else r.get("error")
    return out


# ------------------------------------------------------------------------ main
def parse_model_arg(text: str) -> Tuple[str, Optional[List[int]], Optional[List[int]]]:
    """``NAME[:T,T,...][@B,B,...]`` -> ``(name, frames, batches)`` (``None``: the defaults)."""
    name, frames, batches = text, None, None
    if "@" in name:
        name, b = name.split("@", 1)
        batches = _int_list(b, "batch sizes", text)
    if ":" in name:
        name, f = name.split(":", 1)
        frames = _int_list(f, "latent frame counts", text)
    return name, frames, batches


def _int_list(s: str, what: str, whole: str) -> List[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--models {whole!r}: {what} must be integers (NAME:T,T@B,B)") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--models {whole!r}: {what} must be >= 1 (NAME:T,T@B,B)")
    return vals


def plan_rows(args) -> List[Tuple[ModelSpec, Optional[str], List[Tuple[int, int]]]]:
    """``(spec, weights_dir, [(T, batch), ...])`` per model, in the order given."""
    from dataclasses import replace

    if args.model_dir:
        spec, tdir = spec_from_dir(args.model_dir, args.height, args.width)
        entries = [(spec, None if args.random_weights else tdir, None, None)]
    else:
        entries = []
        for text in (args.models or (QUICK if args.quick else FULL)):
            name, fr, bs = parse_model_arg(text)
            s = get_spec(name)
            if args.height or args.width:
                s = replace(s, height=args.height or s.height, width=args.width or s.width)
            entries.append((s, None, fr, bs))
    out: List[Tuple[ModelSpec, Optional[str], List[Tuple[int, int]]]] = []
    for spec, wdir, fr, bs in entries:
        frames = fr or args.frames or list(spec.frames)
        batches = bs or args.batches or list(spec.batches)
        for v, what in ((frames, "--frames"), (batches, "--batches")):
            if not v or min(v) < 1:
                raise ValueError(f"{what}: values must be >= 1, got {v}")
        P = spec.tokens_per_frame
        if P < 1:
            raise ValueError(f"{spec.name}: {spec.height}x{spec.width} gives no whole patch "
                             f"(VAE x{spec.vae_spatial}, patch {spec.patch[1:]})")
        rows = [(T, b) for T in frames for b in batches]
        if out and out[-1][0] == spec and out[-1][1] == wdir:  # the same model again: build it once
            out[-1][2].extend(r for r in rows if r not in out[-1][2])
        else:
            out.append((spec, wdir, rows))
    return out


def main(args) -> int:
    """Run ``lvsa bench model`` (``args`` from :mod:`lvsa.commands.bench`)."""
    world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.world_size and args.world_size > 1 and world_env == 1:
        return _relaunch_under_torchrun(args)
    if world_env > 1:
        from .. import parallel

        kind = torch.device(args.device).type if args.device else None
        with parallel.distributed(kind) as info:
            return _main(args, info if info.world_size > 1 else None)
    return _main(args, None)


def _main(args, dist_info) -> int:
    from .. import devices

    if args.device and args.device.startswith("npu"):
        devices.npu_status()  # imports torch_npu, which registers the "npu" device type
    if dist_info is not None and dist_info.device is not None:
        device = dist_info.device
    else:
        device = torch.device(args.device) if args.device else devices.default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if args.quick:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    threads = torch.get_num_threads()
    if args.quick and device.type == "cpu" and dist_info is None:
        torch.set_num_threads(1)  # tiny shapes: one thread is faster and steadier on a shared CPU
    try:
        return _run(args, dist_info, device, dtype)
    finally:
        torch.set_num_threads(threads)


def _run(args, dist_info, device, dtype) -> int:
    rank0 = dist_info is None or dist_info.rank == 0
    planned = plan_rows(args)  # bad arguments fail here, before anything is written
    old = common.load_results(args.compare) if args.compare else None
    meta = common.run_meta("lvsa bench model", args.argv, device)
    baselines = selected_baselines(args)
    meta.update(dtype=str(dtype).replace("torch.", ""), warmup=args.warmup, repeats=args.repeats,
                world_size=dist_info.world_size if dist_info else 1, quick=bool(args.quick),
                context_parallel=args.cp_mode if dist_info else None, baselines=baselines)
    single = _load_single_gpu(args.single_gpu_results or [])  # bad files fail here, before the run
    base = common.out_base(args.out, "model", meta["device_before"], args.tag) if rank0 else None
    plan = [(s, w, T, b) for s, w, rows in planned for T, b in rows]
    n_variants = len(baselines) + len(args.backends or ["?"])
    bar = common.Progress(len(plan) * n_variants, "bench model", enabled=rank0 and not args.no_progress)
    records: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    world = dist_info.world_size if dist_info else 1
    calib = [1.0 / world]  # measured / estimated forward time, refined as rows finish
    meta["skipped"] = []
    try:
        for spec, wdir, rows in planned:
            if args.budget_s and _agree(dist_info, all(_row_estimate(spec, T, b, args, calib[0], world) > args.budget_s
                                                       - (time.perf_counter() - t_start) for T, b in rows)):
                left = max(args.budget_s - (time.perf_counter() - t_start), 0)
                for T, b in rows:  # not even the cheapest row fits: do not build the model
                    meta["skipped"].append(f"{spec.name} T{T} B{b} (estimated "
                                           f"{_row_estimate(spec, T, b, args, calib[0], world):.0f}s, {left:.0f}s left)")
                bar.update(n_variants * len(rows))
                continue
            tr = None
            try:
                tr = build_transformer(spec, device, dtype, wdir)
            except Exception as e:  # noqa: BLE001
                err = "OOM" if common.is_oom(e) else f"build failed: {type(e).__name__}: {e}"
                for T, b in rows:
                    rec = _new_record(spec, T, b, dist_info, wdir)
                    rec["variants"] = {v: {"variant": v, "error": err} for v in baselines}
                    records.append(rec)
                    bar.update(n_variants)
                common.free_memory(device)
                continue
            ctx = Context(spec, tr, device, dtype, args, dist_info)
            for T, b in rows:
                rec = _new_record(spec, T, b, dist_info, wdir)
                key = f"{spec.name} T{T} B{b}"
                est = estimate_forward_s(spec, T, b) * calib[0]
                budget_left = args.budget_s - (time.perf_counter() - t_start) if args.budget_s else None
                row_est = _row_estimate(spec, T, b, args, calib[0], world)
                if budget_left is not None and _agree(dist_info, row_est > budget_left):
                    meta["skipped"].append(f"{key} (estimated {row_est:.0f}s, {max(budget_left, 0):.0f}s left)")
                    bar.update(n_variants)
                    continue
                bar.set(key)
                run, refused = lvsa_backends(spec, device, dtype, T, b, args.backends)
                rec["refused"] = refused
                rec["estimate_s"] = est
                cp = args.cp_mode if dist_info else None
                try:
                    inputs = make_inputs(spec, tr, T, b, device, dtype, seed=args.seed)
                except Exception as e:  # noqa: BLE001
                    err = "OOM" if common.is_oom(e) else f"inputs: {type(e).__name__}: {e}"
                    rec["variants"] = {v: {"variant": v, "error": err} for v in baselines + run}
                    records.append(rec)
                    summarize_row(rec)
                    bar.update(n_variants)
                    continue
                probe = agree_dense(ctx, probe_dense_kernels(spec, T, b, device, dtype))
                rec["dense_kernels_ms"] = probe["ms"]
                rec["dense_kernel"] = probe.get("fastest")
                variants = baselines + run
                for v in variants:
                    bar.set(f"{key} {v}")
                    if v == "diffusers" and dist_info and not getattr(tr, "_cp_plan", None):
                        rec["variants"][v] = {"variant": v, "error": "n/a: diffusers 0.42 has no context-parallel "
                                              f"plan for {spec.class_name}"}
                    else:
                        rec["variants"][v] = run_variant(ctx, v, T, inputs, probe,
                                                         cp=cp if v != "diffusers" else None,
                                                         diffusers_cp=bool(dist_info) and v == "diffusers")
                    r = rec["variants"][v]
                    if rank0:
                        bar.write(f"  {key:28s} {v:10s} " + (f"{r['time_s']:.3f} s (attention {r['attention_time_s']:.3f} s)"
                                                             if r.get("time_s") else r.get("error", "")))
                    bar.update(1)
                bar.update(max(0, n_variants - len(variants)))
                if dist_info:
                    _single_gpu(rec, single, ctx, T, inputs, run, probe)
                summarize_row(rec)
                d = rec["variants"].get("dense", {})
                if not d.get("time_s") and spec.family != "hunyuan":  # diffusers' own: a dense cost too
                    d = rec["variants"].get("diffusers", {})
                if d.get("time_s"):
                    calib[0] = d["time_s"] / max(estimate_forward_s(spec, T, b), 1e-9)
                records.append(rec)
                del inputs
                common.free_memory(device)
                if rank0:
                    common.save(base, meta, records, markdown)
            del ctx, tr
            common.free_memory(device)
    finally:
        bar.close()
        meta["total_s"] = time.perf_counter() - t_start
        if rank0:
            meta["device_after"] = common.device_state(device)
            common.finish(base, meta, records, markdown, plot, old, compare_entries)
    return 0


def _row_estimate(spec: ModelSpec, T: int, b: int, args, calib: float, world: int = 1) -> float:
    """Seconds a row should take: diffusers and dense at the dense cost (HunyuanVideo's
    masked diffusers path ~3x), each lvsa backend ~half of it; on ``world`` GPUs each lvsa
    backend also runs once profiled and once on one GPU."""
    est = estimate_forward_s(spec, T, b) * calib  # calib: measured dense / estimate, on `world` GPUs
    nb = len(args.backends or [1, 1])
    per_backend = 0.5 if world == 1 else 1.0 + 0.5 * world
    base = sum(3 if v == "diffusers" and spec.family == "hunyuan" else 1 for v in selected_baselines(args))
    return est * (base + per_backend * nb) * max(1, args.min_repeats)


def selected_baselines(args) -> List[str]:
    """The dense baselines this run times (``--baselines``; default both), in table order."""
    wanted = getattr(args, "baselines", None) or list(BASELINES)
    if "none" in wanted:
        if len(wanted) > 1:
            raise ValueError(f"--baselines {' '.join(wanted)}: 'none' cannot be given with a baseline")
        return []
    bad = [b for b in wanted if b not in BASELINES]
    if bad:
        raise ValueError(f"--baselines {' '.join(bad)}: not a baseline (choose from {', '.join(BASELINES)})")
    return [b for b in BASELINES if b in wanted]


def _new_record(spec: ModelSpec, T: int, b: int, dist_info, wdir: Optional[str] = None) -> Dict[str, Any]:
    rec = {"model": spec.name, "title": spec.title, "family": spec.family, "config_source": spec.source,
           "weights": wdir if wdir and _has_weights(wdir) else "random",
           "batch": b, "height": spec.height, "width": spec.width, "heads": spec.heads,
           "head_dim": spec.head_dim, "layers": spec.layers, "reference": spec.reference,
           "world_size": dist_info.world_size if dist_info else 1, "variants": {}}
    rec.update(row_geometry(spec, T))
    return rec


def _single_gpu(rec: Dict[str, Any], single, ctx: Context, T: int, inputs, run: List[str], dense) -> None:
    """``rec["single_gpu"]``: every 1-GPU time the ``--single-gpu-results`` files have for
    this row (newest file per variant: diffusers' own, the best dense, backends), and the
    lvsa backends they lack timed on rank 0 alone; ``rec["single_gpu_from"]`` says which
    (a file, or ``rank 0``)."""
    have = single.get(row_merge.single_gpu_key(rec), {})
    times = {n: t for n, (t, _) in have.items()}
    origin = {n: src.rel for n, (_, src) in have.items()}
    missing = [v for v in run if rec["variants"].get(v, {}).get("time_s") and v not in times]
    if _agree(ctx, bool(missing)):  # every rank takes part (rank 0 times, the others wait)
        for n, t in _single_gpu_times(ctx, T, inputs, missing, dense).items():
            times[n], origin[n] = t, row_merge.RANK0
    rec["single_gpu"], rec["single_gpu_from"] = times, origin


def _single_gpu_times(ctx: Context, T: int, inputs, variants: List[str], dense) -> Dict[str, float]:
    """Rank 0 times ``variants`` on its GPU alone (no context parallelism) while the other
    ranks wait; every rank gets the times (the 1-GPU baseline of the speedup)."""
    import torch.distributed as dist

    times: Dict[str, float] = {}
    if ctx.dist.rank == 0:
        solo = Context(ctx.spec, ctx.tr, ctx.device, ctx.dtype, ctx.args, None)
        for v in variants:
            r = run_variant(solo, v, T, inputs, dense)
            if r.get("time_s"):
                times[v] = r["time_s"]
    box = [times]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _load_single_gpu(paths: Sequence[str]):
    """The 1-GPU rows of the ``--single-gpu-results`` files, merged (newest per variant)."""
    if not paths:
        return {}
    return row_merge.single_gpu_rows(row_merge.load_sources(paths, "--single-gpu-results"))


# ---------------------------------------------------------------- distributed
def _relaunch_under_torchrun(args) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world_size}",
           "-m", "lvsa", "bench", "model"] + [a for a in args.argv]
    print("[bench] " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)
