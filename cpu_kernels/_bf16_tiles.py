"""Hand-built LLVM for the two inner loops of the decode kernel over bfloat16 pools: the scores of 4
query heads against 4 keys, and a tile's values summed into 4 heads' accumulators.

Numba's own loops (`_kernel._score_tile`, `_accumulate_tile`) leave LLVM to vectorize over
head_dim, and three costs with it: each of the 16 dot products of a 4 x 4 step ends in its own
horizontal sum, the accumulators go to memory and back every 4 keys, and each vectorized loop
starts with run-time checks that the arrays do not overlap. Here, for head_dim a multiple of 32:
- 32 bfloat16 values are one 64-byte load seen as 16 int32, each holding an even and an odd
  element: a shift widens the even ones to float32, a mask the odd ones;
- the 16 dot products are summed together by a tree of shuffles (45 instructions, not 128);
- where `SCORES_BY_DPBF16` (off: it ran slower) and the CPU has AVX512-BF16, `vdpbf16ps` multiplies
  and adds the pairs of 16 int32 in one instruction; the query is then given as bfloat16 parts whose
  sum is exactly the float32 query (one part when the model runs in bfloat16);
- a tile's value sum keeps the 4 heads' accumulators for 64 elements (32 with 256-bit vectors) in
  registers over all its keys.
Accumulators are kept in "split" order: within each 32 elements, the 16 even ones, then the 16 odd
ones (`split_index` maps back).

Without AVX-512 the same loops take 256-bit vectors, of which there are 16 registers, not 32: 16
score sums of 16 lanes would spill. There a load is 16 bfloat16 (split order goes by 16 elements,
`split_width`), a 4 x 4 step is two passes of 2 keys against the 4 heads (8 sums of 8 lanes), and
the value sums take 16 elements of the 4 heads at a time (8 accumulators).
Used by default wherever they apply (`attention.BF16_TILES`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._intrinsics import NamedType, bits_f32, c_array, check_c_array, emit_prefetch, f32_bits

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)
_V4F = ir.VectorType(_F32, 4)
_V8F = ir.VectorType(_F32, 8)
_V8I = ir.VectorType(_I32, 8)
_V2F = ir.VectorType(_F32, 2)
HEADS = 4  # query heads per call: 16 score sums, or 8 accumulator vectors, fit in registers with room to spare
CHUNK = 32  # head_dim elements per 64-byte load
_V32BF = ir.VectorType(NamedType("bfloat"), 32)


# Scores by vdpbf16ps on bfloat16 parts of the query, where the CPU has AVX512-BF16: off. On the
# GPU machine's Emerald Rapids host it ran 0.49 a cycle against 1.96 for vfmadd231ps (4 times fewer
# for 2 times the products: half the rate), and the kernel in cache ran 113 against 135 GB/s on 16
# cores with it (bench/vector_parts.py, bench/cpu_kernel_breakdown.py --variants dpbf16_scores; a
# rerun on a disturbed host said nothing either way).
SCORES_BY_DPBF16 = False


def _has_dpbf16(context) -> bool:
    """Whether the code being compiled may use AVX512-BF16 (the features Numba compiles for)."""
    return "+avx512bf16" in context.codegen()._tm_features.split(",")


def _scores_by_dpbf16(context) -> bool:
    """Whether `score_4x4` takes vdpbf16ps in the code being compiled."""
    return SCORES_BY_DPBF16 and _has_dpbf16(context)


def _has_wide_vectors(context) -> bool:
    """Whether the code being compiled has 512-bit vectors (AVX-512F); else the loops take 256-bit ones."""
    return "+avx512f" in context.codegen()._tm_features.split(",")


def _split_width(context) -> int:
    """Elements of one load, and of one group of split order: 32 with 512-bit vectors, else 16."""
    return CHUNK if _has_wide_vectors(context) else CHUNK // 2


@intrinsic
def split_width(typingctx):
    """`_split_width` of the compiled code, a constant."""

    def codegen(context, builder, signature, args):
        return _I64(_split_width(context))

    return types.int64(), codegen


@intrinsic
def uses_dpbf16(typingctx):
    """True where `score_4x4` uses vdpbf16ps (its query then comes as bfloat16 parts); a constant of
    the compiled code."""

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(1), int(_scores_by_dpbf16(context)))

    return types.boolean(), codegen


def _vector_at(builder, data, offset, vector_type):
    """Pointer to the vector at element `offset` of `data`."""
    return builder.bitcast(builder.gep(data, [offset]), vector_type.as_pointer())


def _load(builder, data, offset, vector_type, align):
    return builder.load(_vector_at(builder, data, offset, vector_type), align=align)


def _splat(builder, scalar, vector_type):
    undefined = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undefined, scalar, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(one, undefined, zeros)


def _widen_pairs(builder, packed):
    """float32 (even, odd) elements of n int32 that each hold two bfloat16 (even in the low half)."""
    n = packed.type.count
    even = builder.shl(packed, ir.Constant(packed.type, [16] * n))
    odd = builder.and_(packed, ir.Constant(packed.type, [-65536] * n))
    floats = ir.VectorType(_F32, n)
    return builder.bitcast(even, floats), builder.bitcast(odd, floats)


def _fma(builder, a, b, c):
    vector = a.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                        f"llvm.fma.v{vector.count}f32")
    return builder.call(fn, [a, b, c])


def _dpbf16(builder, acc, a, b):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF]),
                                        "llvm.x86.avx512bf16.dpbf16ps.512")
    return builder.call(fn, [acc, builder.bitcast(a, _V32BF), builder.bitcast(b, _V32BF)])


def _sum_lanes_together(builder, vectors):
    """One vector whose lane i is the sum of the lanes of vectors[i] (n vectors of n lanes, n 8 or 16).

    Each round pairs neighbours: lane groups of width w become 2 groups of w / 2 (the halves of each
    group added), the first vector's groups first.
    """
    lanes = width = len(vectors)
    mask = ir.VectorType(_I32, lanes)
    while len(vectors) > 1:
        half = width // 2
        groups = lanes // width
        low = [g * width + i for g in range(groups) for i in range(half)]
        low = low + [lanes + x for x in low]
        high = [x + half for x in low]
        paired = []
        for first, second in zip(vectors[::2], vectors[1::2]):
            a = builder.shuffle_vector(first, second, ir.Constant(mask, low))
            b = builder.shuffle_vector(first, second, ir.Constant(mask, high))
            paired.append(builder.fadd(a, b, flags=("reassoc", "nsz")))
        vectors = paired
        width = half
    return vectors[0]


@intrinsic
def score_4x4(typingctx, q_bf16, q_f32, parts, g, pool, rows, j, scale, scores):
    """scores[g + a, j + t] = scale * (q[g + a] . pool[rows[j + t]]) for a, t < 4.

    pool [rows, D] uint16 (bfloat16 bits), D a multiple of 32. The query (of the kv head's G heads):
    where `uses_dpbf16`, `parts` bfloat16 parts packed in pairs, q_bf16 uint32 [3, G, D / 2] (their
    sum is the query); otherwise q_f32 float32 [1, G, D] in split order, and `parts` is 1.
    """
    check_c_array("q_bf16", q_bf16, 3, types.uint32)
    check_c_array("q_f32", q_f32, 3, types.float32)
    check_c_array("pool", pool, 2, types.uint16)
    check_c_array("rows", rows, 1, types.int64)
    check_c_array("scores", scores, 2, types.float32)

    def codegen(context, builder, signature, args):
        at = signature.args
        q_bf16_data, (_, heads, half_d) = c_array(context, builder, at[0], args[0])
        q_f32_data, _ = c_array(context, builder, at[1], args[1])
        first_head = context.cast(builder, args[3], at[3], types.int64)
        first_key = context.cast(builder, args[6], at[6], types.int64)
        pool_data, (_, dim) = c_array(context, builder, at[4], args[4])
        rows_data, _ = c_array(context, builder, at[5], args[5])
        scale = context.cast(builder, args[7], at[7], types.float32)
        scores_data, (_, width) = c_array(context, builder, at[8], args[8])
        dp = _scores_by_dpbf16(context)
        starts = [builder.mul(builder.load(builder.gep(rows_data, [builder.add(first_key, _I64(t))])), dim)
                  for t in range(4)]
        if not dp and not _has_wide_vectors(context):
            for pair in (0, 2):
                _score_2x4(builder, q_f32_data, first_head, dim, pool_data, starts[pair:pair + 2], scale,
                           scores_data, width, builder.add(first_key, _I64(pair)))
            return context.get_dummy_value()
        sums = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(16)]
        n_chunks = builder.udiv(dim, _I64(CHUNK))
        n_parts = context.cast(builder, args[2], at[2], types.int64)
        with cgutils.for_range(builder, n_chunks) as chunk:
            offset = builder.mul(chunk.index, _I64(CHUNK))
            keys = [_load(builder, pool_data, builder.add(s, offset), _V16I, 2) for s in starts]
            if dp:
                with cgutils.for_range(builder, n_parts) as part:
                    for a in range(HEADS):
                        head = builder.add(builder.mul(part.index, heads), builder.add(first_head, _I64(a)))
                        at_q = builder.add(builder.mul(head, half_d), builder.udiv(offset, _I64(2)))
                        query = _load(builder, q_bf16_data, at_q, _V16I, 4)
                        for t in range(4):
                            acc = sums[a * 4 + t]
                            builder.store(_dpbf16(builder, builder.load(acc), keys[t], query), acc)
            else:
                widened = [_widen_pairs(builder, k) for k in keys]
                for a in range(HEADS):
                    at_q = builder.add(builder.mul(builder.add(first_head, _I64(a)), dim), offset)
                    q_even = _load(builder, q_f32_data, at_q, _V16F, 4)
                    q_odd = _load(builder, q_f32_data, builder.add(at_q, _I64(16)), _V16F, 4)
                    for t in range(4):
                        acc = sums[a * 4 + t]
                        even, odd = widened[t]
                        builder.store(_fma(builder, odd, q_odd, _fma(builder, even, q_even, builder.load(acc))), acc)
        total = _sum_lanes_together(builder, [builder.load(s) for s in sums])
        total = builder.fmul(total, _splat(builder, scale, _V16F))
        for a in range(HEADS):
            row = builder.add(builder.mul(builder.add(first_head, _I64(a)), width), first_key)
            lanes = ir.Constant(ir.VectorType(_I32, 4), [a * 4 + t for t in range(4)])
            four = builder.shuffle_vector(total, total, lanes)
            builder.store(four, _vector_at(builder, scores_data, row, _V4F), align=4)
        return context.get_dummy_value()

    return types.none(q_bf16, q_f32, parts, g, pool, rows, j, scale, scores), codegen


def _score_2x4(builder, q_data, first_head, dim, pool_data, starts, scale, scores_data, width, first_key):
    """scores[first_head + a, first_key + t] = scale * (q[first_head + a] . K row t) for a < 4, t < 2,
    with 256-bit vectors: 8 sums of 8 lanes; q float32 [G, dim] in split order by 16, starts the 2
    rows' offsets."""
    sums = [cgutils.alloca_once_value(builder, ir.Constant(_V8F, None)) for _ in range(2 * HEADS)]
    with cgutils.for_range(builder, builder.udiv(dim, _I64(16))) as step:
        offset = builder.mul(step.index, _I64(16))
        keys = [_widen_pairs(builder, _load(builder, pool_data, builder.add(start, offset), _V8I, 2))
                for start in starts]
        for a in range(HEADS):
            at_q = builder.add(builder.mul(builder.add(first_head, _I64(a)), dim), offset)
            even = _load(builder, q_data, at_q, _V8F, 4)
            odd = _load(builder, q_data, builder.add(at_q, _I64(8)), _V8F, 4)
            for t in range(2):
                acc = sums[2 * a + t]
                builder.store(_fma(builder, odd, keys[t][1], _fma(builder, even, keys[t][0], builder.load(acc))), acc)
    total = _sum_lanes_together(builder, [builder.load(s) for s in sums])
    total = builder.fmul(total, _splat(builder, scale, _V8F))
    for a in range(HEADS):
        row = builder.add(builder.mul(builder.add(first_head, _I64(a)), width), first_key)
        two = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(_I32, 2), [2 * a, 2 * a + 1]))
        builder.store(two, _vector_at(builder, scores_data, row, _V2F), align=4)


def _prefetch_row(builder, data, row, dim, level, first, count):
    """Prefetch into L1 (level 1) or L2 (level 2) the 64-byte lines of row `row` (dim uint16) that
    begin among elements first to first + count: the whole row from 0 to dim, or a pass's elements
    (so that passes over consecutive element ranges, of 16 elements with 256-bit vectors, ask for
    each line once)."""
    line_up = lambda x: builder.udiv(builder.add(x, _I64(CHUNK - 1)), _I64(CHUNK))  # noqa: E731
    first_line = line_up(first)
    with cgutils.for_range(builder, builder.sub(line_up(builder.add(first, count)), first_line)) as line:
        at = builder.add(builder.mul(row, dim), builder.mul(builder.add(first_line, line.index), _I64(CHUNK)))
        address = builder.gep(data, [at])
        with builder.if_else(builder.icmp_signed("==", level, _I64(1))) as (into_l1, into_l2):
            with into_l1:
                emit_prefetch(builder, address, 3)
            with into_l2:
                emit_prefetch(builder, address, 2)


@intrinsic
def accumulate_tile(typingctx, probs, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level, spread):
    """acc[g + a] += sum over t < n of probs[g + a, t] * pool[rows[t] + v_rows], for a < 4, in split order.

    probs float32 [G, >= n]; pool [rows, D] uint16 (bfloat16 bits), D a multiple of 32; acc float32 [G, D].
    Meanwhile, unless `level` is 0, prefetches the V rows of ahead[:min(n, n_ahead)] (the next
    tile's K rows) into L1 (1) or L2 (2), one a key: each whole in the first pass over the keys, or
    where `spread`, each pass the lines of the elements it sums (the same requests, spread over
    every pass instead of crowding into the first).
    """
    check_c_array("probs", probs, 2, types.float32)
    check_c_array("pool", pool, 2, types.uint16)
    check_c_array("rows", rows, 1, types.int64)
    check_c_array("acc", acc, 2, types.float32)
    check_c_array("ahead", ahead, 1, types.int64)

    def codegen(context, builder, signature, args):
        at = signature.args
        probs_data, (_, width) = c_array(context, builder, at[0], args[0])
        first_head = context.cast(builder, args[1], at[1], types.int64)
        pool_data, (_, dim) = c_array(context, builder, at[2], args[2])
        rows_data, _ = c_array(context, builder, at[3], args[3])
        v_rows = context.cast(builder, args[4], at[4], types.int64)
        n = context.cast(builder, args[5], at[5], types.int64)
        acc_data, _ = c_array(context, builder, at[6], args[6])
        ahead_data, _ = c_array(context, builder, at[7], args[7])
        n_ahead = context.cast(builder, args[8], at[8], types.int64)
        level = context.cast(builder, args[9], at[9], types.int64)
        spread = context.cast(builder, args[10], at[10], types.boolean)
        heads = [builder.add(first_head, _I64(a)) for a in range(HEADS)]
        step = _split_width(context)  # elements a load: two float32 vectors
        # Loads a pass over the keys: with 32 registers, two (16 accumulators), so that each key's
        # row index, weights and loop count serve 16 multiply-adds, not 8.
        loads = 2 if _has_wide_vectors(context) else 1
        sums = [cgutils.alloca_once(builder, ir.VectorType(_F32, step // 2)) for _ in range(2 * HEADS * loads)]
        prefetching = builder.icmp_signed("!=", level, _I64(0))
        wide_passes = builder.udiv(dim, _I64(step * loads))
        with cgutils.for_range(builder, wide_passes) as each:
            first_pass = builder.and_(prefetching, builder.icmp_signed("==", each.index, _I64(0)))
            _value_pass(builder, builder.mul(each.index, _I64(step * loads)), loads, step, sums, first_pass,
                        builder.and_(prefetching, spread), heads, probs_data, width, pool_data, dim, rows_data,
                        v_rows, n, acc_data, ahead_data, n_ahead, level)
        if loads > 1:  # head_dim an odd number of loads: the last one alone
            rest = builder.urem(dim, _I64(step * loads))
            with builder.if_then(builder.icmp_signed("!=", rest, _I64(0))):
                first_pass = builder.and_(prefetching, builder.icmp_signed("==", wide_passes, _I64(0)))
                _value_pass(builder, builder.sub(dim, rest), 1, step, sums, first_pass, builder.and_(prefetching, spread),
                            heads, probs_data, width, pool_data, dim, rows_data, v_rows, n, acc_data, ahead_data,
                            n_ahead, level)
        return context.get_dummy_value()

    return types.none(probs, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level, spread), codegen


def _value_pass(builder, offset, loads, step, sums, first_pass, spread, heads, probs_data, width, pool_data, dim,
                rows_data, v_rows, n, acc_data, ahead_data, n_ahead, level):
    """One pass of `accumulate_tile` over its n keys, for elements offset to offset + loads * step of
    the 4 heads: their accumulators held in registers (sums) from the first key to the last;
    meanwhile the next tile's V rows prefetched one a key, whole on the first pass or, where `spread`,
    the lines of this pass's elements on every pass."""
    vector, packed = ir.VectorType(_F32, step // 2), ir.VectorType(_I32, step // 2)
    half = _I64(step // 2)
    at_acc = [[builder.add(builder.add(builder.mul(h, dim), offset), _I64(i * step)) for i in range(loads)]
              for h in heads]
    for a in range(len(heads)):
        for i in range(loads):
            builder.store(_load(builder, acc_data, at_acc[a][i], vector, 4), sums[2 * (a * loads + i)])
            builder.store(_load(builder, acc_data, builder.add(at_acc[a][i], half), vector, 4),
                          sums[2 * (a * loads + i) + 1])
    prefetching = builder.or_(first_pass, spread)
    prefetch_first = builder.select(spread, offset, _I64(0))  # the whole row, or this pass's elements
    prefetch_count = builder.select(spread, _I64(loads * step), dim)
    with cgutils.for_range(builder, n) as key:
        with builder.if_then(builder.and_(prefetching, builder.icmp_signed("<", key.index, n_ahead)), likely=False):
            upcoming = builder.add(builder.load(builder.gep(ahead_data, [key.index])), v_rows)
            _prefetch_row(builder, pool_data, upcoming, dim, level, prefetch_first, prefetch_count)
        row = builder.add(builder.load(builder.gep(rows_data, [key.index])), v_rows)
        at_row = builder.add(builder.mul(row, dim), offset)
        halves = [_widen_pairs(builder, _load(builder, pool_data, builder.add(at_row, _I64(i * step)), packed, 2))
                  for i in range(loads)]
        for a, h in enumerate(heads):
            p = builder.load(builder.gep(probs_data, [builder.add(builder.mul(h, width), key.index)]))
            weight = _splat(builder, p, vector)
            for i, (first, second) in enumerate(halves):
                for value, acc in ((first, sums[2 * (a * loads + i)]), (second, sums[2 * (a * loads + i) + 1])):
                    builder.store(_fma(builder, weight, value, builder.load(acc)), acc)
    for a in range(len(heads)):
        for i in range(loads):
            for k, where in ((0, at_acc[a][i]), (1, builder.add(at_acc[a][i], half))):
                builder.store(builder.load(sums[2 * (a * loads + i) + k]), _vector_at(builder, acc_data, where, vector),
                              align=4)


def score_step(q_bf16, q_f32, parts, g, pool, rows, j, scale, scores):
    """`score_4x4` where the pool is bfloat16 bits; never called otherwise (Numba-only)."""
    raise NotImplementedError("score_step is only callable from Numba-compiled code")


@overload(score_step, inline='always')
def _score_step_impl(q_bf16, q_f32, parts, g, pool, rows, j, scale, scores):
    if pool.dtype == types.uint16:
        return lambda q_bf16, q_f32, parts, g, pool, rows, j, scale, scores: score_4x4(
            q_bf16, q_f32, parts, g, pool, rows, j, scale, scores)
    return lambda q_bf16, q_f32, parts, g, pool, rows, j, scale, scores: None


def accumulate_step(probs, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level, spread):
    """`accumulate_tile` where the pool is bfloat16 bits; never called otherwise (Numba-only)."""
    raise NotImplementedError("accumulate_step is only callable from Numba-compiled code")


@overload(accumulate_step)
def _accumulate_step_impl(probs, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level, spread):
    if pool.dtype == types.uint16:
        return lambda probs, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level, spread: accumulate_tile(
            probs, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level, spread)
    return lambda probs, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level, spread: None


@njit(cache=True)
def cpu_has_dpbf16():
    """Whether the kernels compiled for this CPU use vdpbf16ps (`SCORES_BY_DPBF16`, and the CPU has
    AVX512-BF16)."""
    return uses_dpbf16()


@njit(cache=True, _nrt=False)
def split_index(d):
    """Where element d of a head_dim vector sits in split order (even elements, then odd, per 32 or
    16: `split_width`)."""
    width = split_width()
    base = d // width * width
    k = d - base
    return base + k // 2 + (width // 2) * (k % 2)


@njit(cache=True, _nrt=False)
def query_parts(q, b, first, G, q_bf16, q_f32):
    """Lay out query heads q[b, first:first + G] for `score_4x4`; returns its `parts`: bfloat16
    parts (`bfloat16_parts`) where it uses vdpbf16ps, else the float32 query (`split_index` order)."""
    if uses_dpbf16():
        return bfloat16_parts(q, b, first, G, q_bf16)
    for g in range(G):
        for d in range(q.shape[2]):
            q_f32[0, g, split_index(d)] = q[b, first + g, d]
    return 1


@njit(cache=True, _nrt=False)
def bfloat16_parts(q, b, first, G, q_bf16):
    """Split q[b, first:first + G] (float32) into bfloat16 parts whose sum is exactly the query,
    packed in pairs into q_bf16 [3, G, D / 2] (element 2i in the low half); returns how many the
    heads need: 1 where the query is bfloat16 already, at most 3 (8 significant bits each).
    Each part is the top bits of what the parts before it left, cut (not rounded), so that the
    remainder stays exact."""
    parts = 1
    for g in range(G):
        for i in range(q.shape[2] // 2):
            even, odd = q[b, first + g, 2 * i], q[b, first + g, 2 * i + 1]
            for p in range(3):
                top_even = f32_bits(even) & np.uint32(0xFFFF0000)
                top_odd = f32_bits(odd) & np.uint32(0xFFFF0000)
                q_bf16[p, g, i] = (top_even >> np.uint32(16)) | top_odd
                even -= bits_f32(top_even)
                odd -= bits_f32(top_odd)
                if p < 2 and (even != 0 or odd != 0):
                    parts = max(parts, p + 2)
    return parts
