"""The small matrix products inside the time loops: a register-tile GEMM micro-kernel written as LLVM vector
IR, the packing of a matrix into the panels it reads, and the loops that walk tiles over rows and panels.

A product here is out[b] += w @ x[b] for a few rows b (a thread's share of the batch, or batch 1 in
generation) against a matrix w (J, K) that stays in cache from one time step to the next. A BLAS call would
pack w afresh at every step; these kernels read it packed once per window into panels of one vector's
width of outputs (see `pack_panels`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from charlm.kernels.fastmath import FASTMATH

# The recurrent products' register tile: TILE_ROWS batch rows × TILE_PANELS panels of one 64-byte vector
# of columns each: 16 accumulators, half of the 32 vector registers of AVX-512.
TILE_ROWS = 8
TILE_PANELS = 2
# Batch-1 products (generation): one row against this many panels, i.e. blocks of 128 float32 outputs.
VECTOR_PANELS = 8
VECTOR_BYTES = 64
# Rows per block of a window-wide product: the block's rows of x and out stay in L2 while every panel of
# the matrix passes through L1 for all of them.
_PRODUCT_ROW_BLOCK = 64


def panel_width(dtype) -> int:
    """Columns per panel: one 64-byte vector register (16 float32 or 8 float64)."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def pack_panels(matrix, panels) -> None:
    """Copy matrix (J, K) into panels (J / L, K, L): panels[p, k, l] = matrix[p * L + l, k], so that the
    L outputs of one panel at one k are one vector load (or, L = VECTOR_PANELS vectors wide, one contiguous
    stretch for batch 1). matrix may be a strided view such as W_hhᵀ: reading its rows in 64-byte pieces
    beats making it contiguous first. An empty `panels` (where `panels_apply` is false) is left as it is."""
    n_panels, n_in, width = panels.shape
    if n_panels == 0:
        return
    np.copyto(panels, matrix.reshape(n_panels, width, n_in).transpose(0, 2, 1))


def panels_apply(n_out: int, dtype, n_rows: int) -> bool:
    """Whether products of n_rows rows with a (n_out, K) matrix can use whole tiles, so that packing the
    matrix pays (else they use dot form): enough rows for one tile, and whole tiles of panels."""
    return n_rows >= TILE_ROWS and n_out % (TILE_PANELS * panel_width(dtype)) == 0


def _tile_product(tile_rows: int, tile_panels: int, interleaved: bool = False):
    """An intrinsic add_tile_product(x, panels, out, row, panel) for tiles of tile_rows × tile_panels.

    interleaved: panels is (J / (tile_panels * L), K, tile_panels * L), the tile's panels side by side at
    each k (`pack_panels` with panels that wide), and `panel` counts tiles of panels; the k loop then reads
    one contiguous stream, where separate panels would be tile_panels streams for the prefetcher."""

    @intrinsic
    def add_tile_product(typingctx, x, panels, out, row, panel):
        """out[row : row + tile_rows, panel * L : (panel + tile_panels) * L] += the product of those rows of
        x (B, K) with panels[panel : panel + tile_panels] (see `pack_panels`), all C-contiguous.

        A register-blocked GEMM micro-kernel written as LLVM vector IR: tile_rows × tile_panels accumulators
        stay in vector registers for the whole k loop, and each k costs tile_panels vector loads and tile_rows
        broadcasts for tile_rows × tile_panels fused multiply-adds. (Numba's own loops vectorise such a
        product only as dot products, each ending in a horizontal sum: costly when K is only 256.)"""
        arrays = (x, panels, out)
        if not all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == x.dtype for a in arrays) or \
                (x.ndim, panels.ndim, out.ndim) != (2, 3, 2) or x.dtype not in (types.float32, types.float64):
            return None

        def codegen(context, builder, signature, args):
            x_arr, panel_arr, out_arr = (context.make_array(ty)(context, builder, value)
                                         for ty, value in zip(signature.args[:3], args[:3]))
            row, panel = args[3], args[4]
            intp = context.get_value_type(types.intp)
            width = panel_width(np.float32 if x.dtype == types.float32 else np.float64)
            vector = ir.VectorType(context.get_value_type(x.dtype), width)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{width}f{x.dtype.bitwidth}")
            n_in = cgutils.unpack_tuple(builder, x_arr.shape, 2)[1]
            n_out = cgutils.unpack_tuple(builder, out_arr.shape, 2)[1]

            def const(value):
                return ir.Constant(intp, value)

            x_rows = [builder.gep(x_arr.data, [builder.mul(builder.add(row, const(r)), n_in)])
                      for r in range(tile_rows)]
            if interleaved:
                step = tile_panels * width
                tile_start = builder.gep(panel_arr.data, [builder.mul(panel, builder.mul(n_in, const(step)))])
                panel_starts = [builder.gep(tile_start, [const(q * width)]) for q in range(tile_panels)]
            else:
                step = width
                panel_size = builder.mul(n_in, const(width))
                panel_starts = [builder.gep(panel_arr.data, [builder.mul(builder.add(panel, const(q)), panel_size)])
                                for q in range(tile_panels)]
            zero = ir.Constant(vector, [0.0] * width)
            accumulators = [[cgutils.alloca_once_value(builder, zero) for _ in range(tile_panels)]
                            for _ in range(tile_rows)]
            undefined = ir.Constant(vector, ir.Undefined)
            lane0 = ir.Constant(ir.IntType(32), 0)
            broadcast_mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
            with cgutils.for_range(builder, n_in) as loop:
                offset = builder.mul(loop.index, const(step))
                columns = [builder.load(builder.bitcast(builder.gep(start, [offset]), vector.as_pointer()), align=4)
                           for start in panel_starts]
                for r in range(tile_rows):
                    value = builder.insert_element(undefined, builder.load(builder.gep(x_rows[r], [loop.index])), lane0)
                    value = builder.shuffle_vector(value, undefined, broadcast_mask)
                    for q in range(tile_panels):
                        acc = accumulators[r][q]
                        builder.store(builder.call(fma, [value, columns[q], builder.load(acc)]), acc)
            first_column = builder.mul(panel, const(tile_panels * width if interleaved else width))
            for r in range(tile_rows):
                out_row = builder.gep(out_arr.data, [builder.add(builder.mul(builder.add(row, const(r)), n_out),
                                                                 first_column)])
                for q in range(tile_panels):
                    target = builder.bitcast(builder.gep(out_row, [const(q * width)]), vector.as_pointer())
                    total = builder.fadd(builder.load(target, align=4), builder.load(accumulators[r][q]))
                    builder.store(total, target, align=4)
            return context.get_dummy_value()

        return types.void(x, panels, out, types.intp, types.intp), codegen

    return add_tile_product


_add_tile_product = _tile_product(TILE_ROWS, TILE_PANELS)
_add_row_tile = _tile_product(1, TILE_PANELS)  # the rows after the whole tiles
# Batch 1 (generation): one row against VECTOR_PANELS panels, i.e. that many independent accumulators and
# no horizontal sums; the matrix streams from cache once per token.
_add_vector_product = _tile_product(1, VECTOR_PANELS, interleaved=True)


@njit(cache=True, fastmath=FASTMATH)
def dot(row, x):
    """row · x as one contiguous, vectorised inner product."""
    acc = row.dtype.type(0.0)
    for k in range(row.shape[0]):
        acc += row[k] * x[k]
    return acc


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def add_row_products(x, w, panels, out, lo, hi):
    """out[b] += w @ x[b] for the rows b in [lo, hi): x: (B, K), w: (J, K); panels: w packed by
    `pack_panels`, or a (0, K, L) array where `panels_apply` is false: only then is w read.

    The time loop's recurrent products: a thread's few rows against a matrix of a few MB, which a BLAS
    call would pack afresh at every step. Whole tiles of rows go through the register-blocked kernel, with
    the panels for all of them (and for the rows after them, one at a time) before the next panels,
    which stay in cache; without panels, as dot products."""
    if panels.shape[0] == 0:
        for b in range(lo, hi):
            for j in range(w.shape[0]):
                out[b, j] += dot(w[j], x[b])
        return
    n_tiles = (hi - lo) // TILE_ROWS
    for panel in range(0, panels.shape[0], TILE_PANELS):
        for tile in range(n_tiles):
            _add_tile_product(x, panels, out, lo + tile * TILE_ROWS, panel)
        for b in range(lo + n_tiles * TILE_ROWS, hi):
            _add_row_tile(x, panels, out, b, panel)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def project_rows(x, w, panels, bias, out, lo, hi):
    """out[b] = bias + w @ x[b] for the rows b in [lo, hi) (x: (N, K), w: (J, K), panels: w packed, see
    `add_row_products`), a block of rows at a time: a window-wide input projection, or one step's."""
    for start in range(lo, hi, _PRODUCT_ROW_BLOCK):
        stop = min(start + _PRODUCT_ROW_BLOCK, hi)
        for b in range(start, stop):
            out[b, :] = bias
        add_row_products(x, w, panels, out, start, stop)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _add_matvec_block(x, w, panels, out, start, stop):
    """out[0, j] += w[j] · x[0] for j in [start, stop), one block of VECTOR_PANELS panels (or the last, shorter
    block): through `panels` (w's whole blocks packed by `pack_panels` into (N, K, block)) when they hold the
    block, else as dot products. x: (1, K), out: (1, J)."""
    block = panels.shape[2]
    if stop <= panels.shape[0] * block and stop - start == block:
        _add_vector_product(x, panels, out, 0, start // block)
    else:
        row, sums = x[0], out[0]
        for j in range(start, stop):
            sums[j] += dot(w[j], row)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def add_matvec(x, w, panels, out, lo, hi):
    """out[0, j] += w[j] · x[0] for j in [lo, hi) (lo on a block boundary), block by block through
    `_add_matvec_block`: batch 1, a generation thread's share of one matrix's outputs."""
    block = panels.shape[2]
    for start in range(lo, hi, block):
        _add_matvec_block(x, w, panels, out, start, min(start + block, hi))
