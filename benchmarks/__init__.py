"""Benchmarks of the state-space layers: ours against the published traceTorch 0.19.2.

``python -m benchmarks`` (see ``benchmarks/__main__.py``) runs:

- ``benchmarks.step``: per-step latency against 0.19.2, first as the table
  of the step targets (eager, training by stepping, ``TTcompile``, NumPy,
  MLX), then every available backend in inference, training,
  ``TTcompile`` and ``torch.compile`` modes, and a check that stepping does
  not grow memory;
- ``benchmarks.scan``: whole sequences: the exp-and-matmul floor, stepping
  0.19.2, our stepping, our ``scan`` (eager and compiled), and Mamba's peers
  (mamba.py, transformers), forward and forward+backward, with peak memory
  and first-call time;
- ``benchmarks.report``: Markdown tables, PNG plots and the machine summary.

The published ``tracetorch==0.19.2`` is installed apart (``benchmarks._published``).
"""

import os

# Inductor otherwise starts a pool of compile workers that keep a 2-core
# machine busy while the timings run; one in-process compile thread avoids it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
