"""``lvsa plan``: the sparse schedule for a model preset or explicit geometry."""
from __future__ import annotations

import argparse
import json
import os


# ------------------------------------------------------------------ plan
def register(sub):
    p = sub.add_parser(
        "plan", help="show the sparse schedule for a model preset or explicit geometry",
        description=(
            "Compute the lvsa schedule (keyframe interval, global frames, windows, sparsity) "
            "for a model preset or explicit geometry and print the mask picture "
            "(G global, W window, X both, . skipped). LVSA_* variables apply; flags win."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("geometry")
    g.add_argument("--model", default="wan2.1-t2v-1.3b",
                   help="model preset (reference horizon, VAE factors, patch size, default size); "
                        "`lvsa info --presets` lists them")
    g.add_argument("--num-frames", type=int, help="video frames F ((F-1) %% t == 0); default: the preset's")
    g.add_argument("--latent-frames", type=int, help="latent frames T (instead of --num-frames)")
    g.add_argument("--height", type=int, help="video height (default: the preset's)")
    g.add_argument("--width", type=int, help="video width (default: the preset's)")
    g.add_argument("--patches-per-frame", type=int, help="tokens per latent frame P (instead of --height/--width)")
    g.add_argument("--text-tokens", type=int, default=None, help="text tokens joined to the sequence (default: the preset's)")
    s = p.add_argument_group("schedule (defaults from LVSA_* / config)")
    s.add_argument("--window-size", type=int, help="window half-width in video frames (LVSA_WINDOW_SIZE)")
    s.add_argument("--n-first-frames", type=int, help="leading global frames, video frames (LVSA_N_FIRST_FRAMES)")
    s.add_argument("--reference-latent-frames", type=int, help="training horizon in latent frames")
    s.add_argument("--sparsity-scale", type=float, help="budget multiplier, < 1 sparser (LVSA_SPARSITY_SCALE)")
    s.add_argument("--key-frame-interval", type=int, help="fixed keyframe interval in video frames "
                   "(// the VAE temporal factor: 16 = 4 latent); turns auto off (LVSA_KEY_FRAME_INTERVAL)")
    s.add_argument("--no-rotate", action="store_true", help="do not rotate the keyframe grid per step")
    s.add_argument("--no-expand", action="store_true", help="plain (not expanded) windows")
    s.add_argument("--world-size", type=int, default=1, help="context-parallel world size")
    o = p.add_argument_group("output")
    o.add_argument("--steps", type=int, default=None, help="print the rotation for this many denoising steps")
    o.add_argument("--step", type=int, default=0, help="the step whose mask picture is printed")
    o.add_argument("--no-picture", action="store_true", help="omit the mask picture")
    o.add_argument("--json", action="store_true", help="machine-readable output (whole schedule)")
    p.set_defaults(func=cmd_plan)


def _plan_inputs(args):
    from ..config import Config
    from ..schedule import get_preset, latent_frames, patches_per_frame

    for flag, val, lo in (("--num-frames", args.num_frames, 1),
                          ("--patches-per-frame", args.patches_per_frame, 1), ("--latent-frames", args.latent_frames, 1),
                          ("--text-tokens", args.text_tokens, 0), ("--step", args.step, 0),
                          ("--steps", args.steps, 0), ("--world-size", args.world_size, 1),
                          ("--height", args.height, 1), ("--width", args.width, 1)):
        if val is not None and val < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {val}")

    preset = get_preset(args.model)
    settings = {"window_size": args.window_size, "n_first_frames": args.n_first_frames,
                "reference_latent_frames": args.reference_latent_frames,
                "sparsity_scale": args.sparsity_scale}
    if args.key_frame_interval is not None:
        settings.update(key_frame_interval=args.key_frame_interval, auto_keyframes=False)
    if args.no_rotate:
        settings["rotate_keyframes"] = False
    if args.no_expand:
        settings["expand_window"] = False
    if "LVSA_VAE_TEMPORAL_FACTOR" not in os.environ and "LVSA_CONFIG" not in os.environ:
        settings["vae_temporal_factor"] = preset.vae_temporal_factor
    cfg = Config.load(**settings)
    if args.latent_frames is not None:
        T = args.latent_frames
    else:
        T = latent_frames(preset.default_num_frames if args.num_frames is None else args.num_frames,
                          cfg.vae_temporal_factor)
    if args.patches_per_frame is not None:
        P = args.patches_per_frame
    else:
        P = patches_per_frame(preset.default_height if args.height is None else args.height,
                              preset.default_width if args.width is None else args.width,
                              preset.vae_spatial_factor, preset.patch_size)
    text = preset.text_tokens if args.text_tokens is None else args.text_tokens
    return preset, cfg, T, P, text


def cmd_plan(args) -> int:
    from ..engine import Engine

    preset, cfg, T, P, text = _plan_inputs(args)
    eng = Engine(family=preset.family, config=cfg, world_size=args.world_size)
    sched = eng.schedule(T, P)
    mask = sched.mask_for_step(args.step)
    n_steps = args.steps if args.steps is not None else min(sched.key_frame_interval, 8) if sched.rotate else 1
    rotation = [{"step": s, "offset": sched.offset_for_step(s),
                 "globals": list(sched.mask_for_step(s).globals)} for s in range(n_steps)]
    if args.json:
        d = sched.to_dict()
        d.update(model=preset.name, P=P, text_tokens=text, seq_len=T * P + text,
                 reference_source=cfg.sources.get("reference_latent_frames", f"preset {preset.name}"),
                 rotation=rotation)
        print(json.dumps(d, indent=1))
        return 0
    s = mask.summary()
    print(f"model={preset.name} T_lat={T} P={P} text={text} seq_len={T * P + text} "
          f"W={sched.window} n={sched.n_first} scale={sched.scale:g}")
    print(f"[LVSA] reference_latent_frames={sched.reference} target_latent_frames={T} "
          f"extension_ratio={sched.extension_ratio:.2f}x")
    print(f"[LVSA] {'computed' if sched.auto else 'fixed'} key_frame_interval={sched.key_frame_interval} (latent frames)")
    print(f"[LVSA] kfi={sched.key_frame_interval} global_count={s.global_count} "
          f"attended_per_frame={s.attended_max}/{T}")
    mode = "DENSE (T_lat <= ref)" if sched.dense else "SPARSE"
    print(f"sparsity={mask.sparsity():.3f} density={mask.density():.3f} "
          f"attended per frame min/mean/max={s.attended_min}/{s.attended_mean:.1f}/{s.attended_max} -> {mode}")
    if sched.boundary_frames:
        print(f"context-parallel boundary frames (fixed globals): {list(sched.boundary_frames)}")
    print("rotation:")
    for r in rotation:
        print(f"  step {r['step']}: offset {r['offset']} globals {r['globals']}")
    if not args.no_picture:
        print(f"mask at step {args.step} (offset {mask.offset}):")
        print(mask.to_string())
    return 0
