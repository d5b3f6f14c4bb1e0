"""AMX tile products for the decode kernel over bfloat16 pools (Intel Sapphire Rapids and later).

One `tdpbf16ps` multiplies 16 rows of 32 bfloat16 by 32 x 16 and adds into 16 x 16 float32; the
CPU kernel's vector loops (`_bf16_tiles`) spend most of their time on those products. Here:
- scores: 16 K rows, read as they lie in the pool (or gathered into a buffer when they do not lie
  in a row), times the query heads as the columns of the second operand, bfloat16 parts of the
  query (their sum is the float32 query) accumulated into the same columns;
- value sums: the probabilities as the first operand, 2 rows a head (a bfloat16 high part and the
  rounded rest, so the weights keep 16 significant bits), times 32 V rows interleaved in pairs
  (the second operand's layout); the accumulators stay in tiles over up to 4 chunks of 32 keys and
  in memory between, in an order of head_dim set by the interleave (`amx_index` maps back).
Tile shapes are constants (16 rows of 64 bytes) and each head_dim gets straight-line code (one
case of a switch), so that no tile value crosses a loop or a branch. Where the code is compiled
for a CPU without AMX, the intrinsics compile to nothing and `cpu_has_amx` is False; the tile data
also needs Linux's permission, asked once by `request_tile_data`.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._bf16_tiles import CHUNK, bfloat16_parts
from ._intrinsics import NamedType, bits_f32, c_array, check_c_array, f32_bits

TILE_ROWS, TILE_BYTES = 16, 64
MAX_DIM = 256  # head_dims with straight-line code: multiples of 32 up to this
MAX_PARTS = 3
MAX_HEADS = TILE_ROWS // 2  # query heads per kv head: two probability rows each
# Independent chains of tile products in flight: 3 accumulators, 3 operands and the shared one fill
# 7 of the 8 tile registers.
SCORE_GROUPS = 3  # groups of 16 keys scored together
VALUE_GROUPS = 3  # 16-element groups of head_dim summed together
VALUE_CHUNKS = 4  # chunks of 32 keys (one tile row of weights) summed before the accumulators go back
_AMX, _I16, _I32, _I64 = NamedType("x86_amx"), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_P8 = ir.IntType(8).as_pointer()
_V32W = ir.VectorType(_I16, 32)


def _has_amx(context) -> bool:
    features = context.codegen()._tm_features.split(",")
    return "+amx-tile" in features and "+amx-bf16" in features


@intrinsic
def uses_amx(typingctx):
    """True where the code is compiled for a CPU with AMX bfloat16 tiles; a constant."""

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(1), int(_has_amx(context)))

    return types.boolean(), codegen


@njit(cache=True)
def cpu_has_amx():
    return uses_amx()


def request_tile_data() -> bool:
    """Ask Linux for the AMX tile data state for this process (every thread); True if granted."""
    if not sys.platform.startswith("linux"):
        return False
    sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18  # x86-64
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


class Tiles:
    """The tile intrinsics, declared in one module, with this kernel's one tile shape."""

    def __init__(self, builder):
        m = builder.module
        self.builder = builder
        self._load = self._declare(m, "llvm.x86.tileloadd64.internal", _AMX, [_I16, _I16, _P8, _I64])
        self._dot = self._declare(m, "llvm.x86.tdpbf16ps.internal", _AMX, [_I16, _I16, _I16, _AMX, _AMX, _AMX])
        self._store = self._declare(m, "llvm.x86.tilestored64.internal", ir.VoidType(), [_I16, _I16, _P8, _I64, _AMX])
        self._zero = self._declare(m, "llvm.x86.tilezero.internal", _AMX, [_I16, _I16])
        self.rows, self.width = _I16(TILE_ROWS), _I16(TILE_BYTES)

    @staticmethod
    def _declare(module, name, ret, args):
        return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)

    def zero(self):
        return self.builder.call(self._zero, [self.rows, self.width])

    def load(self, data, offset, stride_bytes):
        b = self.builder
        return b.call(self._load, [self.rows, self.width, b.bitcast(b.gep(data, [offset]), _P8), stride_bytes])

    def dot(self, acc, a, bt):
        return self.builder.call(self._dot, [self.rows, self.width, self.width, acc, a, bt])

    def store(self, data, offset, stride_bytes, tile):
        b = self.builder
        b.call(self._store, [self.rows, self.width, b.bitcast(b.gep(data, [offset]), _P8), stride_bytes, tile])


def _cases(builder, key, cases, emit):
    """switch (key) { case k: emit(*args) } for (k, args) in cases; straight-line code per case."""
    done = builder.append_basic_block("amx_done")
    switch = builder.switch(key, done)
    for k, args in cases:
        block = builder.append_basic_block(f"amx_case_{k}")
        switch.add_case(_I64(k), block)
        builder.position_at_end(block)
        emit(*args)
        builder.branch(done)
    builder.position_at_end(done)


def _bits_pool(pool) -> bool:
    """Whether `pool` is 16-bit (the tile code applies); other pools compile to no code (the kernel
    is typed for every pool but takes these loops only for bfloat16)."""
    if not (isinstance(pool, types.Array) and pool.ndim == 2 and pool.layout == "C"):
        raise TypeError(f"pool: expected a C-contiguous 2-d array, got {pool}")
    return pool.dtype == types.uint16


@intrinsic
def score_rows(typingctx, pool, starts, kbuf, groups, qtiles, parts, sbuf, j):
    """sbuf[j + 16i + t, c] = sum over p < parts of K_it . column c of qtiles[p], for 16 keys t of
    each group i < groups (at most SCORE_GROUPS).

    K_it = pool[starts[i] + t] where starts[i] >= 0, else kbuf[16i + t]; pool, kbuf uint16 [*, D]
    (bfloat16 bits), D a multiple of 32 up to MAX_DIM; qtiles uint32 [MAX_PARTS, D / 32, 16, 16]
    (`query_tiles`); sbuf float32 [>= j + 16 groups, 16]. The groups' products interleave, in
    tiles of their own: tile registers are not renamed, so one chain of products waits on itself.
    """
    applies = _bits_pool(pool)
    check_c_array("starts", starts, 1, types.int64)
    check_c_array("kbuf", kbuf, 2, types.uint16)
    check_c_array("qtiles", qtiles, 4, types.uint32)
    check_c_array("sbuf", sbuf, 2, types.float32)

    def codegen(context, builder, signature, args):
        if not (applies and _has_amx(context)):
            return context.get_dummy_value()
        at = signature.args
        pool_data, (_, dim) = c_array(context, builder, at[0], args[0])
        starts_data, _ = c_array(context, builder, at[1], args[1])
        kbuf_data, _ = c_array(context, builder, at[2], args[2])
        q_data, _ = c_array(context, builder, at[4], args[4])
        s_data, _ = c_array(context, builder, at[6], args[6])
        n_groups = context.cast(builder, args[3], at[3], types.int64)
        n_parts = context.cast(builder, args[5], at[5], types.int64)
        first = context.cast(builder, args[7], at[7], types.int64)
        keys = []
        for i in range(SCORE_GROUPS):
            start = builder.load(builder.gep(starts_data, [_I64(i)]))
            in_pool = builder.gep(pool_data, [builder.mul(start, dim)])
            in_buffer = builder.gep(kbuf_data, [builder.mul(_I64(TILE_ROWS * i), dim)])
            keys.append(builder.select(builder.icmp_signed(">=", start, _I64(0)), in_pool, in_buffer))
        stride = builder.mul(dim, _I64(2))
        tiles = Tiles(builder)

        def emit(chunks, used_parts, used_groups):
            accs = [tiles.zero() for _ in range(used_groups)]
            for c in range(chunks):
                ks = [tiles.load(keys[i], _I64(c * CHUNK), stride) for i in range(used_groups)]
                for p in range(used_parts):
                    query = tiles.load(q_data, _I64((p * chunks + c) * TILE_ROWS * TILE_ROWS), _I64(TILE_BYTES))
                    accs = [tiles.dot(acc, k, query) for acc, k in zip(accs, ks)]
            for i, acc in enumerate(accs):
                tiles.store(s_data, builder.mul(builder.add(first, _I64(TILE_ROWS * i)), _I64(TILE_ROWS)), _I64(TILE_BYTES), acc)

        key = builder.add(builder.mul(builder.add(builder.mul(builder.udiv(dim, _I64(CHUNK)), _I64(MAX_PARTS + 1)), n_parts),
                                      _I64(SCORE_GROUPS + 1)), n_groups)
        cases = [((c * (MAX_PARTS + 1) + p) * (SCORE_GROUPS + 1) + g, (c, p, g))
                 for c in range(1, MAX_DIM // CHUNK + 1) for p in range(1, MAX_PARTS + 1) for g in range(1, SCORE_GROUPS + 1)]
        _cases(builder, key, cases, emit)
        return context.get_dummy_value()

    return types.none(pool, starts, kbuf, groups, qtiles, parts, sbuf, j), codegen


@intrinsic
def interleave_values(typingctx, pool, rows, j, v_rows, vbuf, k):
    """vbuf[k, 2c + h, r] = the 16 element pairs (V row of key 2r, of key 2r + 1) of half h of
    32-element chunk c, for the 32 keys rows[j:j + 32] + v_rows: the second tile operand's layout.

    A pair's low half holds the even key. The halves are those of an unpack within 128-bit lanes
    (h 0: elements 8L to 8L + 3 of each lane L, h 1: 8L + 4 to 8L + 7); `amx_index` maps back.
    vbuf uint32 [VALUE_CHUNKS, D / 16, 16, 16].
    """
    applies = _bits_pool(pool)
    check_c_array("rows", rows, 1, types.int64)
    check_c_array("vbuf", vbuf, 4, types.uint32)

    def codegen(context, builder, signature, args):
        if not applies:
            return context.get_dummy_value()
        at = signature.args
        pool_data, (_, dim) = c_array(context, builder, at[0], args[0])
        rows_data, _ = c_array(context, builder, at[1], args[1])
        first = context.cast(builder, args[2], at[2], types.int64)
        v_rows = context.cast(builder, args[3], at[3], types.int64)
        v_data, _ = c_array(context, builder, at[4], args[4])
        which = context.cast(builder, args[5], at[5], types.int64)
        # chunk k of vbuf starts at k * (D / 16) * 256 words, 512 halves
        out = builder.gep(builder.bitcast(v_data, _I16.as_pointer()), [builder.mul(which, builder.mul(dim, _I64(32)))])
        low = [8 * lane + i + 32 * second for lane in range(4) for i in range(4) for second in (0, 1)]
        high = [x + 4 for x in low]
        n_chunks = builder.udiv(dim, _I64(CHUNK))
        with cgutils.for_range(builder, _I64(TILE_ROWS)) as pair:
            starts = []
            for t in (0, 1):
                key = builder.add(first, builder.add(builder.mul(pair.index, _I64(2)), _I64(t)))
                row = builder.add(builder.load(builder.gep(rows_data, [key])), v_rows)
                starts.append(builder.mul(row, dim))
            with cgutils.for_range(builder, n_chunks) as chunk:
                offset = builder.mul(chunk.index, _I64(CHUNK))
                even, odd = (builder.load(builder.bitcast(builder.gep(pool_data, [builder.add(s, offset)]),
                                                          _V32W.as_pointer()), align=2) for s in starts)
                for h, order in ((0, low), (1, high)):
                    group = builder.add(builder.mul(chunk.index, _I64(2)), _I64(h))
                    at_out = builder.mul(builder.add(builder.mul(group, _I64(TILE_ROWS)), pair.index), _I64(2 * TILE_ROWS))
                    paired = builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(_I32, 32), order))
                    builder.store(paired, builder.bitcast(builder.gep(out, [at_out]), _V32W.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(pool, rows, j, v_rows, vbuf, k), codegen


@intrinsic
def add_values(typingctx, pbuf, j, chunks, vbuf, acc):
    """acc[r, i] += sum over the 32 chunks keys k of pbuf[r, j + k] * V_k at position i, for r < 16.

    pbuf uint16 [16, W] (bfloat16 weights); vbuf from `interleave_values` for chunks k < chunks (at
    most VALUE_CHUNKS); acc float32 [16, D], D a multiple of 32 up to MAX_DIM, in `amx_index` order.
    VALUE_GROUPS accumulators at a time stay in tiles over all the chunks, in tiles of their own.
    """
    check_c_array("pbuf", pbuf, 2, types.uint16)
    check_c_array("vbuf", vbuf, 4, types.uint32)
    check_c_array("acc", acc, 2, types.float32)

    def codegen(context, builder, signature, args):
        if not _has_amx(context):
            return context.get_dummy_value()
        at = signature.args
        p_data, (_, width) = c_array(context, builder, at[0], args[0])
        first = context.cast(builder, args[1], at[1], types.int64)
        n_chunks = context.cast(builder, args[2], at[2], types.int64)
        v_data, _ = c_array(context, builder, at[3], args[3])
        acc_data, (_, dim) = c_array(context, builder, at[4], args[4])
        tiles = Tiles(builder)
        acc_stride = builder.mul(dim, _I64(4))
        p_stride = builder.mul(width, _I64(2))

        def emit(groups, chunks):
            for g0 in range(0, groups, VALUE_GROUPS):
                gs = range(g0, min(g0 + VALUE_GROUPS, groups))
                accs = [tiles.load(acc_data, _I64(g * TILE_ROWS), acc_stride) for g in gs]
                for k in range(chunks):
                    weights = tiles.load(p_data, builder.add(first, _I64(k * 2 * TILE_ROWS)), p_stride)
                    values = [tiles.load(v_data, _I64((k * groups + g) * TILE_ROWS * TILE_ROWS), _I64(TILE_BYTES))
                              for g in gs]
                    accs = [tiles.dot(acc, weights, v) for acc, v in zip(accs, values)]
                for g, acc in zip(gs, accs):
                    tiles.store(acc_data, _I64(g * TILE_ROWS), acc_stride, acc)

        groups = builder.udiv(dim, _I64(TILE_ROWS))
        key = builder.add(builder.mul(groups, _I64(VALUE_CHUNKS + 1)), n_chunks)
        cases = [(g * (VALUE_CHUNKS + 1) + c, (g, c)) for g in range(2, MAX_DIM // TILE_ROWS + 1, 2)
                 for c in range(1, VALUE_CHUNKS + 1)]
        _cases(builder, key, cases, emit)
        return context.get_dummy_value()

    return types.none(pbuf, j, chunks, vbuf, acc), codegen


@njit(cache=True, _nrt=False)
def amx_index(d):
    """Where element d of a head_dim vector sits in the value accumulators (`interleave_values`)."""
    base = d // CHUNK
    k = d - base * CHUNK
    lane = k // 8
    rest = k - lane * 8
    return (2 * base + rest // 4) * TILE_ROWS + 4 * lane + rest % 4


@njit(cache=True, _nrt=False)
def query_tiles(q, b, first, G, q_bf16, qtiles):
    """Lay out query heads q[b, first:first + G] as the score tiles' second operand: qtiles[p, c, r, g]
    = dims 32c + 2r and + 1 of bfloat16 part p of head g (0 for g >= G); returns the parts used."""
    parts = bfloat16_parts(q, b, first, G, q_bf16)
    for p in range(qtiles.shape[0]):
        for c in range(qtiles.shape[1]):
            for r in range(TILE_ROWS):
                for g in range(TILE_ROWS):
                    qtiles[p, c, r, g] = q_bf16[p, g, c * TILE_ROWS + r] if g < G and p < parts else 0
    return parts


@njit(fastmath=True, cache=True, _nrt=False)
def weight_rows(scores, n, n32, pbuf):
    """pbuf[2g], pbuf[2g + 1] = the bfloat16 high part of probabilities scores[g, :n] and the rest
    rounded to nearest (so that their sum keeps 16 significant bits); 0 up to n32."""
    for g in range(scores.shape[0]):
        for j in range(n):
            bits = f32_bits(scores[g, j])
            top = bits & np.uint32(0xFFFF0000)
            rest = f32_bits(scores[g, j] - bits_f32(top))
            pbuf[2 * g, j] = np.uint16(bits >> np.uint32(16))
            pbuf[2 * g + 1, j] = np.uint16((rest + np.uint32(0x7FFF) + ((rest >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        for j in range(n, n32):
            pbuf[2 * g, j] = 0
            pbuf[2 * g + 1, j] = 0
