"""Vectorisable exp, tanh and sigmoid for the kernels, and the compiler flags they are written for.

Without a vector math library Numba calls libm's exp/tanh one element at a time, which keeps every loop
around them scalar. In float32 these are plain arithmetic (polynomials and a bit trick), so the gate and
softmax loops vectorise; in float64 they are libm's, whose every digit the finite-difference checks need.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# Fast-math without "nnan"/"ninf": the softmax's max subtraction and the sampling code must see infinities.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Numba's default Python error model checks every float division for zero and raises: that branch keeps a
# loop scalar. With numpy's (x/0 = inf, as IEEE) the rational tanh's divide vectorises.
ERROR_MODEL = "numpy"

# Odd rational approximation of tanh on [-7.905, 7.905] (Eigen's float version), ~3 ulp in float32.
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
# Cephes expf: exp(x) = 2**n * exp(r) with |r| <= ln2/2, a degree-7 polynomial for exp(r); ~1 ulp.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)


def tanh(x):
    """tanh for the kernels: the rational approximation in float32, exact libm tanh in float64 (whose
    finite-difference gradient checks need every digit)."""
    return np.tanh(x)


def sigmoid(x):
    """Logistic sigmoid for the kernels, through `tanh` in float32."""
    return 1.0 / (1.0 + np.exp(-x))


def exp(x):
    """exp for the kernels: vectorisable Cephes expf in float32, libm exp in float64."""
    return np.exp(x)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (builds 2**n from its exponent field)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@overload(exp, jit_options={"fastmath": FASTMATH, "error_model": ERROR_MODEL})
def _exp_overload(x):
    if x != types.float32:
        return lambda x: np.exp(x)
    c0, c1, c2, c3, c4, c5 = (np.float32(c) for c in _EXP_POLY)
    log2e, ln2_hi, ln2_lo = np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
    low, high, half, one = np.float32(-87.0), np.float32(88.0), np.float32(0.5), np.float32(1.0)

    def float32_exp(x):
        x = min(max(x, low), high)
        n = np.floor(x * log2e + half)
        r = x - n * ln2_hi - n * ln2_lo
        p = (((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * r * r + r + one
        return p * _float32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))

    return float32_exp


@overload(tanh, jit_options={"fastmath": FASTMATH, "error_model": ERROR_MODEL})
def _tanh_overload(x):
    if x != types.float32:
        return lambda x: np.tanh(x)
    p0, p1, p2, p3, p4, p5, p6 = (np.float32(c) for c in _TANH_P)
    q0, q1, q2, q3 = (np.float32(c) for c in _TANH_Q)
    clamp = np.float32(_TANH_CLAMP)

    def float32_tanh(x):
        x = min(max(x, -clamp), clamp)
        x2 = x * x
        p = ((((((p0 * x2 + p1) * x2 + p2) * x2 + p3) * x2 + p4) * x2 + p5) * x2 + p6) * x
        q = ((q0 * x2 + q1) * x2 + q2) * x2 + q3
        return p / q

    return float32_tanh


@overload(sigmoid, jit_options={"fastmath": FASTMATH, "error_model": ERROR_MODEL})
def _sigmoid_overload(x):
    if x != types.float32:
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    half = np.float32(0.5)
    return lambda x: half * tanh(half * x) + half
