"""Numba kernels of the LSTM language model.

- `target`: the CPU Numba compiles for (vector ISA, registers) and its caches.
- `fastmath`: vectorisable exp, tanh and sigmoid, and the compiler flags every kernel uses.
- `gemm`: the register-tile GEMM micro-kernel, the packing of matrices into panels, the product loops,
  the tile shape for the target.
- `tuning`: tile rows timed once per CPU and shape where the registers leave a choice ("wisdom").
- `lstm`: the model's forward/backward pairs (embedding, the layers' time loops, softmax cross-entropy).
- `dropout`: dropout masks from a counter-based hash.
- `generate`: batch-1 generation and sampling.
- `utf8`: checking, counting and mapping the code points of raw UTF-8 bytes (corpus reading, char encoding).

Conventions: B = batch rows, H = hidden size, gates come in blocks of H in the order i, f, g, o
(PyTorch's), all arrays are C-contiguous and float32 or float64 (each kernel compiles once per dtype and
is cached on disk, so a second process starts warm).
"""
