# Sourced by the device scripts that use FlashAttention-4 (the fa4 backend). With .fa4/ carried
# (fa4site.tar.xz: an installed tree of flash-attn-4, nvidia-cutlass-dsl and their needs, built as
# benchmarks/NOTES.md says), it is extracted into .gpu-site/ (git-ignored), which the device keeps
# for the next call while the machine is warm. Whenever .gpu-site/ holds FA4, it goes on
# PYTHONPATH and `fa4` is set to "fa4" once `import flash_attn.cute` works (else ""), so a script
# can name the backend only where it runs.
site=$PWD/.gpu-site
if [ -f .fa4/fa4site.tar.xz ]; then mkdir -p "$site" && tar -xJf .fa4/fa4site.tar.xz -C "$site" || exit 1; fi
# tvm_ffi.core links libtvm_ffi_testing.so, which its wheel does not ship
[ -f .fa4/libtvm_ffi_testing.so ] && [ -d "$site/tvm_ffi/lib" ] && cp .fa4/libtvm_ffi_testing.so "$site/tvm_ffi/lib/"
fa4=""
if [ -d "$site/flash_attn" ]; then
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$site:$site/nvidia_cutlass_dsl/dsl_packages
  if err=$(python3 -c "import flash_attn.cute" 2>&1); then fa4=fa4
  else echo "[run] flash_attn.cute does not import: $(echo "$err" | tail -1)" >&2; fi
fi
