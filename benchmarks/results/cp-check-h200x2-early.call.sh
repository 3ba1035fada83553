#!/usr/bin/env bash
# The device call that produced cp-check-h200x2-early.*: the cp branch at 15fea0e (git archive into .gpu/repo),
# run on nvidia-h200-x2 with .gpu and .whl carried: `bash .gpu/call1.sh`
# early CP check on 2 H200s: cp branch snapshot in .gpu/repo, wheels in .whl
set -uo pipefail
root=$(pwd)
cd .gpu/repo && ln -sf "$root/.whl" .whl
tag=cp1
source "$root/.gpu/device_setup.sh"
python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())'
python3 -c 'import flashinfer, diffusers; print("fi", flashinfer.__version__, "diffusers", diffusers.__version__)'
nvidia-smi topo -m
export LVSA_DIST_TIMEOUT=600
timeout 480 torchrun --nproc-per-node 2 benchmarks/cp_check.py --out "$out" --tag h200x2-early --time 2 2>&1 | grep -v "^\[LVSA\] \(reference_latent\|computed\|kfi=\)" | tail -80
du -sh /tmp/ficache 2>/dev/null
tar -cJf "$out/ficache.tar.xz" -C /tmp ficache 2>/dev/null; ls -la "$out"
echo "[run] total $(( $(date +%s) - start ))s"
