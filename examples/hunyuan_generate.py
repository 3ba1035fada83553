"""Standalone HunyuanVideo 1.5 generation with the flags the troubleshooting guide uses.

    python examples/hunyuan_generate.py \
        --model /models/HunyuanVideo-1.5-Diffusers-480p_t2v \
        --num-frames 257 --output-dir benchmarks --output-name out_2x \
        --lvsa --flashinfer --rotate-keyframes --auto-keyframes --output-latent

A thin front end over ``lvsa generate``: ``--output-dir``/``--output-name`` become the
output path (``.mp4``, or ``.pt`` with ``--output-latent``, which skips the VAE decode so a
long run cannot lose its work to a decode OOM; ``lvsa decode`` finishes it later).
Without ``--lvsa`` the run is the dense baseline. Without ``--model`` it uses the built-in
tiny HunyuanVideo 1.5 (random weights: noise), so the command works offline.
"""
import argparse
import os
import sys


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-hunyuan", help="local diffusers directory, or tiny-hunyuan")
    p.add_argument("--prompt", default="a corgi running on a beach at sunset")
    p.add_argument("--num-frames", type=int, default=None, help="video frames ((F-1) %% 4 == 0)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs", help="directory (relative paths resolve against the cwd)")
    p.add_argument("--output-name", default="hunyuan", help="file name without extension")
    p.add_argument("--output-latent", action="store_true", help="save the denoised latent (.pt), skip decode")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (default: a numbered name such as out_2x-1.pt)")
    p.add_argument("--lvsa", action="store_true", help="use lvsa sparse attention (default: dense baseline)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--flashinfer", action="store_const", const="flashinfer", dest="backend",
                   help="lvsa backend flashinfer")
    b.add_argument("--triton", action="store_const", const="triton", dest="backend", help="lvsa backend triton")
    p.add_argument("--rotate-keyframes", action="store_true", help="LVSA_ROTATE_KEYFRAMES=1 (lvsa's default)")
    p.add_argument("--auto-keyframes", action="store_true", help="LVSA_AUTO_KEYFRAMES=1 (lvsa's default)")
    return p


def to_generate_argv(a) -> list:
    ext = ".pt" if a.output_latent else ".mp4"
    out = os.path.join(a.output_dir, a.output_name + ext)
    argv = ["generate", "--model", a.model, "--prompt", a.prompt, "--seed", str(a.seed),
            "--output-latent" if a.output_latent else "--output", out]
    for flag, val in (("--num-frames", a.num_frames), ("--height", a.height), ("--width", a.width),
                      ("--steps", a.steps)):
        if val is not None:
            argv += [flag, str(val)]
    if a.overwrite:
        argv.append("--overwrite")
    if not a.lvsa:
        argv.append("--no-lvsa")
    elif a.backend:
        argv += ["--backend", a.backend]
    return argv


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.rotate_keyframes:
        os.environ["LVSA_ROTATE_KEYFRAMES"] = "1"
    if a.auto_keyframes:
        os.environ["LVSA_AUTO_KEYFRAMES"] = "1"
    from lvsa.cli import main as lvsa_main
    return lvsa_main(to_generate_argv(a))


if __name__ == "__main__":
    sys.exit(main())
