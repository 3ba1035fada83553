"""``lvsa bench``: benchmarks users run on their own NVIDIA, Ascend or CPU machine.

* :mod:`lvsa.bench.attention` — one attention call per backend at preset shapes, dense
  baselines, output checked against the reference (``lvsa bench attention``);
* :mod:`lvsa.bench.model` — a whole transformer forward of the real diffusers
  architecture at real size with random weights (``lvsa bench model``);
* :mod:`lvsa.bench.report` — the README's performance sections regenerated from
  committed results files (``lvsa bench report``);
* :mod:`lvsa.bench.rows` — a model row's summary (speedups, the ceiling) and the merge of
  several results files (the newest file per variant);
* :mod:`lvsa.bench.common` — timing, the device record (NVML / nvidia-smi, npu-smi, CPU),
  JSON + Markdown + PNG output, ``--compare``.

Everything here is imported lazily by :mod:`lvsa.commands.bench`; diffusers and
matplotlib are optional (``pip install 'lvsa[diffusers,bench]'``).
"""
