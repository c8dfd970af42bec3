"""Benchmarks of the state-space layers: ours against the published traceTorch 0.19.2.

Run ``python -m benchmarks [--quick] [--only step,scan] [--rounds N] [--out DIR]``.

- ``benchmarks.step``: per-step latency of S4, S5, S6 and Mamba on every
  available backend (torch CPU/CUDA, NumPy, MLX, CuPy), in inference,
  autograd, ``TTcompile`` and ``torch.compile`` modes, plus an RSS check.
- ``benchmarks.scan``: whole sequences, upstream stepping vs our stepping vs
  our ``scan``, forward and forward+backward, with peak memory.
- ``benchmarks.report``: Markdown tables, PNG plots and the machine summary.

The published ``tracetorch==0.19.2`` is installed apart, under
``benchmarks/.published``, and imported as ``tracetorch_published``
(``benchmarks._published``).
"""

import os

# Inductor otherwise starts a pool of compile workers that keep a 2-core
# machine busy while the timings run; one in-process compile thread avoids it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
