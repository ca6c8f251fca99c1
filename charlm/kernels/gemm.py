"""The small matrix products inside the time loops: a register-tile GEMM micro-kernel written as LLVM vector
IR, the packing of a matrix into the panels it reads, the loops that walk tiles over rows and panels, and
the tile shape for the CPU they are compiled for.

A product here is out[b] += w @ x[b] for a few rows b (a thread's share of the batch, or batch 1 in
generation) against a matrix w (J, K) that stays in cache from one time step to the next. A BLAS call would
pack w afresh at every step; these kernels read it packed once per window into panels of one vector's
width of outputs (see `pack_panels`).

The shape of a tile is a `Tile`, passed to every kernel that multiplies: its Numba type carries the shape,
so each shape is a compiled function of its own, and a kernel cached on disk for one shape (or, through
Numba's cache key, for one CPU) is never run with another.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, overload_attribute, register_model, typeof_impl, unbox

from charlm.kernels.fastmath import FASTMATH
from charlm.kernels.target import CompileTarget, caches, compile_target

# Fused multiply-adds in flight that keep a core's FMA units busy (two units × four cycles of latency on
# current x86 and ARM cores): batch-1 products keep this many independent accumulators.
FMA_IN_FLIGHT = 8
# The L2 size assumed where the OS does not report one.
DEFAULT_L2_BYTES = 1 << 20


@dataclass(frozen=True)
class Tile:
    """The register tile of the products: `rows` rows of x × `panels` panels of one `vector_bytes` vector
    of outputs each, accumulated in registers; batch-1 products use one row × `vector_panels` panels
    side by side (see `pack_panels`). fused: multiply-adds as FMA instructions (else multiply, then add)."""
    vector_bytes: int
    rows: int
    panels: int
    vector_panels: int
    fused: bool


class TileType(types.Type):
    """Numba's type of a `Tile`: one type per shape, so a kernel compiles (and is cached) once per shape."""

    def __init__(self, tile: Tile):
        self.tile = tile
        super().__init__(name=f"Tile({tile.vector_bytes}B, {tile.rows}x{tile.panels}, "
                              f"{tile.vector_panels}, {'fma' if tile.fused else 'mul+add'})")


@typeof_impl.register(Tile)
def _typeof_tile(value, context):
    return TileType(value)


@register_model(TileType)
class _TileModel(models.PrimitiveModel):
    """A tile carries nothing at run time: its shape is in its type."""

    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.IntType(8))


@unbox(TileType)
def _unbox_tile(typ, obj, c):
    return NativeValue(ir.Constant(ir.IntType(8), 0))


def _constant_attribute(field: str) -> None:
    """tile.<field> in compiled code: a constant of the tile's type."""

    @overload_attribute(TileType, field)
    def constant(tile):
        value = getattr(tile.tile, field)
        return lambda tile: value


for _field in ("rows", "panels", "vector_panels"):
    _constant_attribute(_field)


def tile_for(target: CompileTarget) -> Tile:
    """The tile for a compile target, from its register file: 16 accumulators, half the registers, where
    there are 32 (8 rows × 2 panels: a thread's share of a batch of 16 or 32 rows is whole tiles); 12 where
    there are 16 (6 rows × 2 panels, plus 2 loaded panels and a broadcast row value: 15 registers, the
    shape of BLIS's Haswell sgemm micro-kernel)."""
    rows = 8 if target.vector_registers >= 32 else 6
    return Tile(target.vector_bytes, rows, 2, FMA_IN_FLIGHT, target.fused_multiply_add)


@functools.cache
def default_tile() -> Tile:
    """The tile for the CPU this process compiles for."""
    return tile_for(compile_target())


def panel_width(dtype, tile: Tile) -> int:
    """Columns per panel: one vector register of the dtype."""
    return tile.vector_bytes // np.dtype(dtype).itemsize


def pack_panels(matrix, panels) -> None:
    """Copy matrix (J, K) into panels (J / L, K, L): panels[p, k, l] = matrix[p * L + l, k], so that the
    L outputs of one panel at one k are one vector load (or, L = vector_panels vectors wide, one contiguous
    stretch for batch 1). matrix may be a strided view such as W_hhᵀ: reading its rows in 64-byte pieces
    beats making it contiguous first. An empty `panels` (where `panels_apply` is false) is left as it is."""
    n_panels, n_in, width = panels.shape
    if n_panels == 0:
        return
    np.copyto(panels, matrix.reshape(n_panels, width, n_in).transpose(0, 2, 1))


def panels_apply(n_out: int, dtype, n_rows: int, tile: Tile) -> bool:
    """Whether products of n_rows rows with a (n_out, K) matrix can use whole tiles, so that packing the
    matrix pays (else they use dot form): enough rows for one tile, and whole tiles of panels."""
    return n_rows >= tile.rows and n_out % (tile.panels * panel_width(dtype, tile)) == 0


def row_block(n_in: int, n_out: int, dtype, tile: Tile) -> int:
    """Rows per block of a window-wide product (`project_rows`): as many whole tiles of rows as keep the
    block's rows of x (K wide) and out (J wide) in half of one core's L2, while every panel of the matrix
    passes through L1 for all of them; at least one tile."""
    l2 = caches().l2 or DEFAULT_L2_BYTES
    rows = l2 // 2 // ((n_in + n_out) * np.dtype(dtype).itemsize)
    return max(tile.rows, rows // tile.rows * tile.rows)


def _tile_product(fixed_rows: int | None = None, interleaved: bool = False):
    """An intrinsic add_tile_product(x, panels, out, row, panel, tile) for tiles of the tile's rows (or
    fixed_rows) × the tile's panels (`Tile.panels`, or `Tile.vector_panels` when interleaved) of its vector
    width.

    interleaved: panels is (J / (n * L), K, n * L), the tile's n panels side by side at each k
    (`pack_panels` with panels that wide), and `panel` counts tiles of panels; the k loop then reads one
    contiguous stream, where separate panels would be n streams for the prefetcher."""

    @intrinsic
    def add_tile_product(typingctx, x, panels, out, row, panel, tile):
        """out[row : row + tile_rows, panel * L : (panel + n) * L] += the product of those rows of x (B, K)
        with panels[panel : panel + n] (see `pack_panels`), all C-contiguous.

        A register-blocked GEMM micro-kernel written as LLVM vector IR: tile_rows × n accumulators stay in
        vector registers for the whole k loop, and each k costs n vector loads and tile_rows broadcasts for
        tile_rows × n multiply-adds. (Numba's own loops vectorise such a product only as dot products, each
        ending in a horizontal sum: costly when K is only 256.)"""
        arrays = (x, panels, out)
        if not all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == x.dtype for a in arrays) or \
                (x.ndim, panels.ndim, out.ndim) != (2, 3, 2) or x.dtype not in (types.float32, types.float64) or \
                not isinstance(tile, TileType):
            return None
        shape = tile.tile
        tile_rows = shape.rows if fixed_rows is None else fixed_rows
        tile_panels = shape.vector_panels if interleaved else shape.panels
        width = panel_width(np.float32 if x.dtype == types.float32 else np.float64, shape)

        def codegen(context, builder, signature, args):
            x_arr, panel_arr, out_arr = (context.make_array(ty)(context, builder, value)
                                         for ty, value in zip(signature.args[:3], args[:3]))
            row, panel = args[3], args[4]
            intp = context.get_value_type(types.intp)
            vector = ir.VectorType(context.get_value_type(x.dtype), width)
            if shape.fused:
                fma = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{width}f{x.dtype.bitwidth}")

                def multiply_add(a, b, c):
                    return builder.call(fma, [a, b, c])
            else:  # llvm.fma would be a library call per element: a multiply, then an add
                def multiply_add(a, b, c):
                    return builder.fadd(builder.fmul(a, b), c)
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
                        builder.store(multiply_add(value, columns[q], builder.load(acc)), acc)
            first_column = builder.mul(panel, const(tile_panels * width if interleaved else width))
            for r in range(tile_rows):
                out_row = builder.gep(out_arr.data, [builder.add(builder.mul(builder.add(row, const(r)), n_out),
                                                                 first_column)])
                for q in range(tile_panels):
                    target = builder.bitcast(builder.gep(out_row, [const(q * width)]), vector.as_pointer())
                    total = builder.fadd(builder.load(target, align=4), builder.load(accumulators[r][q]))
                    builder.store(total, target, align=4)
            return context.get_dummy_value()

        return types.void(x, panels, out, types.intp, types.intp, tile), codegen

    return add_tile_product


_add_tile_product = _tile_product()
# The rows after the whole tiles (fewer than a tile's), in tiles of 4, 2 and 1 rows.
_add_four_rows = _tile_product(4)
_add_two_rows = _tile_product(2)
_add_one_row = _tile_product(1)
# Batch 1 (generation): one row against the tile's vector_panels panels, i.e. that many independent
# accumulators and no horizontal sums; the matrix streams from cache once per token.
_add_vector_product = _tile_product(1, interleaved=True)


@njit(cache=True, fastmath=FASTMATH)
def dot(row, x):
    """row · x as one contiguous, vectorised inner product."""
    acc = row.dtype.type(0.0)
    for k in range(row.shape[0]):
        acc += row[k] * x[k]
    return acc


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def add_row_products(x, w, panels, out, lo, hi, tile):
    """out[b] += w @ x[b] for the rows b in [lo, hi): x: (B, K), w: (J, K); panels: w packed by
    `pack_panels` for `tile`, or a (0, K, L) array where `panels_apply` is false: only then is w read.

    The time loop's recurrent products: a thread's few rows against a matrix of a few MB, which a BLAS
    call would pack afresh at every step. Whole tiles of rows go through the register-blocked kernel, with
    the panels for all of them (and for the rows after them, in smaller tiles) before the next panels,
    which stay in cache; without panels, as dot products."""
    if panels.shape[0] == 0:
        for b in range(lo, hi):
            for j in range(w.shape[0]):
                out[b, j] += dot(w[j], x[b])
        return
    n_tiles = (hi - lo) // tile.rows
    rest = lo + n_tiles * tile.rows
    for panel in range(0, panels.shape[0], tile.panels):
        for k in range(n_tiles):
            _add_tile_product(x, panels, out, lo + k * tile.rows, panel, tile)
        b = rest
        while hi - b >= 4:
            _add_four_rows(x, panels, out, b, panel, tile)
            b += 4
        if hi - b >= 2:
            _add_two_rows(x, panels, out, b, panel, tile)
            b += 2
        if hi - b == 1:
            _add_one_row(x, panels, out, b, panel, tile)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def project_rows(x, w, panels, bias, out, lo, hi, block, tile):
    """out[b] = bias + w @ x[b] for the rows b in [lo, hi) (x: (N, K), w: (J, K), panels: w packed, see
    `add_row_products`), `block` rows at a time (see `row_block`): a window-wide input projection, or one
    step's."""
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        for b in range(start, stop):
            out[b, :] = bias
        add_row_products(x, w, panels, out, start, stop, tile)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _add_matvec_block(x, w, panels, out, start, stop, tile):
    """out[0, j] += w[j] · x[0] for j in [start, stop), one block of the tile's vector_panels panels (or the
    last, shorter block): through `panels` (w's whole blocks packed by `pack_panels` into (N, K, block))
    when they hold the block, else as dot products. x: (1, K), out: (1, J)."""
    block = panels.shape[2]
    if stop <= panels.shape[0] * block and stop - start == block:
        _add_vector_product(x, panels, out, 0, start // block, tile)
    else:
        row, sums = x[0], out[0]
        for j in range(start, stop):
            sums[j] += dot(w[j], row)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def add_matvec(x, w, panels, out, lo, hi, tile):
    """out[0, j] += w[j] · x[0] for j in [lo, hi) (lo on a block boundary), block by block through
    `_add_matvec_block`: batch 1, a generation thread's share of one matrix's outputs."""
    block = panels.shape[2]
    for start in range(lo, hi, block):
        _add_matvec_block(x, w, panels, out, start, min(start + block, hi), tile)
