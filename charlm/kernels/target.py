"""The CPU the kernels are compiled for: its vector instructions, register file and caches.

Numba compiles for the CPU name and feature list it gives LLVM: the host's, or NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES when set (NUMBA_CPU_NAME alone keeps the host's features: NUMBA_CPU_NAME=haswell
still compiles AVX-512 code on an AVX-512 host; with NUMBA_CPU_FEATURES= it takes Haswell's own). Rather
than interpret names and feature lists, `compile_target` asks LLVM, with those same settings, to compile a
64-byte fused multiply-add and reads which registers and instructions it chose. Cache sizes come from Linux's
sysfs, the CPU model from /proc/cpuinfo; either may be missing, and then the figures that depend on them
fall back to stated defaults.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding as ll
from numba.core import codegen, config

from charlm.runtime import available_cores

# Each vector ISA the kernels know: (bytes per vector register, vector registers), as LLVM uses them.
ISA_REGISTERS = {
    "avx512": (64, 32),   # x86 AVX-512: 32 zmm registers
    "avx2": (32, 16),     # x86 AVX2 with FMA: 16 ymm registers
    "avx": (32, 16),      # x86 AVX without FMA (multiply, then add)
    "sse": (16, 16),      # x86-64 baseline: 16 xmm registers
    "neon": (16, 32),     # AArch64 Advanced SIMD: 32 128-bit registers
    "generic": (16, 16),  # anything else: LLVM splits or scalarises what the target lacks, always correct
}

_PROBE_IR = """
define void @probe(<16 x float>* %a) {
  %x = load <16 x float>, <16 x float>* %a, align 4
  %y = call <16 x float> @llvm.fma.v16f32(<16 x float> %x, <16 x float> %x, <16 x float> %x)
  %z = fadd <16 x float> %y, %x
  store <16 x float> %z, <16 x float>* %a, align 4
  ret void
}
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
"""
_SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(frozen=True)
class CompileTarget:
    """What Numba compiles for. features: as passed to LLVM ('' = the CPU name's own); isa: a key of
    ISA_REGISTERS; fused_multiply_add: whether the target has FMA instructions (else llvm.fma would be a
    library call per element)."""
    cpu_name: str
    features: str
    isa: str
    fused_multiply_add: bool

    @property
    def vector_bytes(self) -> int:
        return ISA_REGISTERS[self.isa][0]

    @property
    def vector_registers(self) -> int:
        return ISA_REGISTERS[self.isa][1]


@dataclass(frozen=True)
class Caches:
    """Data cache sizes in bytes as one core sees them (None where the OS does not say): l2 is the L2 of
    one core, l3 the last level shared by several."""
    l1d: int | None
    l2: int | None
    l3: int | None


def numba_cpu() -> tuple[str, str]:
    """The CPU name and feature string Numba gives LLVM in this process (see the module docstring)."""
    name = config.CPU_NAME or ll.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return name, features


@functools.cache
def compile_target() -> CompileTarget:
    """The vector ISA Numba compiles for in this process, read from the code LLVM makes of a 64-byte FMA."""
    name, features = numba_cpu()
    codegen.initialize_llvm()
    machine = ll.Target.from_default_triple().create_target_machine(cpu=name, features=features, opt=2)
    module = ll.parse_assembly(_PROBE_IR)
    module.triple = ll.get_process_triple()
    asm = machine.emit_assembly(module).lower()
    arch = platform.machine().lower()
    if arch in ("x86_64", "amd64"):
        fused = "vfmadd" in asm
        if "zmm" in asm:
            isa = "avx512"
        elif "ymm" in asm:
            isa = "avx2" if fused else "avx"
        else:
            isa = "sse"
    elif arch in ("aarch64", "arm64"):
        fused = "fmla" in asm
        isa = "neon" if re.search(r"\bv\d+\.4s\b", asm) else "generic"
    else:
        fused, isa = False, "generic"
    return CompileTarget(name, features, isa, fused)


def _size(text: str) -> int | None:
    """Bytes of a sysfs cache size such as '2048K'."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    if match is None:
        return None
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]]


@functools.cache
def caches() -> Caches:
    """The data caches of CPU 0 (Linux sysfs); None for each level the OS does not report."""
    sizes: dict[int, int] = {}
    for index in sorted(_SYSFS_CACHE.glob("index*")) if _SYSFS_CACHE.is_dir() else []:
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and size:
            sizes[level] = size
    return Caches(sizes.get(1), sizes.get(2), sizes.get(3))


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo's "model name" on Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> dict:
    """The target and caches as plain data, for logs and benchmark headers."""
    target, sizes = compile_target(), caches()
    return {"cpu_model": cpu_model(), "cpu_name": target.cpu_name, "isa": target.isa,
            "vector_bytes": target.vector_bytes, "vector_registers": target.vector_registers,
            "fused_multiply_add": target.fused_multiply_add, "l1d_bytes": sizes.l1d, "l2_bytes": sizes.l2,
            "l3_bytes": sizes.l3, "cores": available_cores()}
