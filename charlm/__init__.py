"""charlm: a CPU-first LSTM language-model toolkit (numpy + Numba kernels)."""

import os
import sys


def _prefer_haswell_openblas_kernels() -> None:
    """On AMD CPUs with AVX2, ask numpy's OpenBLAS for its Haswell kernels before numpy loads.

    OpenBLAS picks the AVX-512 SkylakeX kernels on Zen 4, which run small-row GEMMs (16 x 512 @ 512 x 2048)
    slower than its Haswell kernels (docs/performance.md). OpenBLAS reads OPENBLAS_CORETYPE only
    when it loads, so this can only act when charlm is imported before numpy. A user's own
    OPENBLAS_CORETYPE always wins; CHARLM_OPENBLAS_CORETYPE=keep turns this off.
    """
    if "numpy" in sys.modules or "OPENBLAS_CORETYPE" in os.environ:
        return
    if os.environ.get("CHARLM_OPENBLAS_CORETYPE", "").lower() == "keep":
        return
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            head = cpuinfo.read(1 << 16)
    except OSError:
        return
    fields = {}
    for line in head.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor = fields.get("vendor_id", "")
    flags = fields.get("flags", "").split()
    if vendor == "AuthenticAMD" and "avx2" in flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


_prefer_haswell_openblas_kernels()
