"""The Numba decode-attention kernel over host KV blocks: one pass over K and V, online softmax.

Work is cut into units of equal token counts across all (batch row, kv head) pairs, so that batch 1
with 8 KV heads still fills every core and no thread count leaves one unit of a head's remainder
running alone (cut per head, 15 threads ran 25% slower than 16); each unit leaves a partial (max,
sum, unnormalized accumulator) per head it touches, and a second parallel loop merges a head's
partials.
Within a unit, tokens go by tiles. The pool is seen as rows of D elements; each K and V row is
read straight from the pool once, widened to float32 in registers, and used by 4 query heads
and 4 tokens at a time, so that the D-long inner loops vectorize and reuse every load.
While a tile is computed, the next tile's rows are prefetched: the hardware prefetchers stop at
4 KiB pages, and tiles jump between blocks and between K and V.
The helpers the parallel tasks call compile without Numba's reference counting (`_nrt=False`; they
allocate nothing): a counted call adds and drops a reference to the pool, which every thread
shares, with atomic instructions on one cache line. The hand-built score step (every 4 keys) and the
prefetch helpers are inlined (`inline='always'`): as calls, each passed its arrays field by field on
the stack, and the kernel ran 12-20% slower in cache on a 2-core Zen 3 host (two runs of
`bench/cpu_kernel_breakdown.py --variants full called_steps`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._amx_tiles import (SCORE_GROUPS, VALUE_CHUNKS, add_values, amx_index, interleave_values, query_tiles, score_rows,
                         weight_rows)
from ._bf16_tiles import HEADS, accumulate_step, query_parts, score_step, split_index
from ._intrinsics import exponent_to_f32, prefetch_l1, prefetch_l2, store_release, to_f32

# The inner loops a call runs: Numba's own, the hand-built vector loops of `_bf16_tiles`, or the AMX
# tile products of `_amx_tiles` (the last two for bfloat16 pools; the caller checks they apply).
LOOPS, BF16_LOOPS, AMX_TILES = 0, 1, 2

# No "nnan"/"ninf": the softmax state starts at -inf and empty heads must end at lse -inf.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _exp_nonpositive(x):
    """exp(x) for x <= 0 in float32 that LLVM can vectorize (libm's expf stays scalar).

    Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 Taylor polynomial (error ~2e-7
    relative), scaled by 2**k through k's exponent bits. Below -87 returns ~1e-38, not 0; the
    caller never relies on an exact 0 from here.
    """
    x = max(x, np.float32(-87.0))
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * exponent_to_f32(np.int32(k))


@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _score_tile(qs, pool, fp16, rows, n4, scores, ahead, n_ahead, level):
    """scores[g, j] = qs[g] . pool[rows[j]] for j < n4 (a multiple of 4); meanwhile prefetches
    the K rows ahead[:n_ahead] of the next tile."""
    G, D = qs.shape
    for j in range(0, n4, 4):
        _prefetch_step(pool, ahead, j, n4, n_ahead, 0, level)
        r0, r1, r2, r3 = rows[j], rows[j + 1], rows[j + 2], rows[j + 3]
        if G % 4 == 0:
            for g in range(0, G, 4):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                c0 = c1 = c2 = c3 = e0 = e1 = e2 = e3 = np.float32(0.0)
                for d in range(D):
                    k0, k1 = to_f32(pool[r0, d], fp16), to_f32(pool[r1, d], fp16)
                    k2, k3 = to_f32(pool[r2, d], fp16), to_f32(pool[r3, d], fp16)
                    x = qs[g, d]
                    a0, a1, a2, a3 = a0 + x * k0, a1 + x * k1, a2 + x * k2, a3 + x * k3
                    x = qs[g + 1, d]
                    b0, b1, b2, b3 = b0 + x * k0, b1 + x * k1, b2 + x * k2, b3 + x * k3
                    x = qs[g + 2, d]
                    c0, c1, c2, c3 = c0 + x * k0, c1 + x * k1, c2 + x * k2, c3 + x * k3
                    x = qs[g + 3, d]
                    e0, e1, e2, e3 = e0 + x * k0, e1 + x * k1, e2 + x * k2, e3 + x * k3
                scores[g, j], scores[g, j + 1], scores[g, j + 2], scores[g, j + 3] = a0, a1, a2, a3
                scores[g + 1, j], scores[g + 1, j + 1], scores[g + 1, j + 2], scores[g + 1, j + 3] = b0, b1, b2, b3
                scores[g + 2, j], scores[g + 2, j + 1], scores[g + 2, j + 2], scores[g + 2, j + 3] = c0, c1, c2, c3
                scores[g + 3, j], scores[g + 3, j + 1], scores[g + 3, j + 2], scores[g + 3, j + 3] = e0, e1, e2, e3
        else:
            for g in range(G):
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for d in range(D):
                    x = qs[g, d]
                    a0 += x * to_f32(pool[r0, d], fp16)
                    a1 += x * to_f32(pool[r1, d], fp16)
                    a2 += x * to_f32(pool[r2, d], fp16)
                    a3 += x * to_f32(pool[r3, d], fp16)
                scores[g, j], scores[g, j + 1], scores[g, j + 2], scores[g, j + 3] = a0, a1, a2, a3


@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _row_max(row, n):
    """max(row[:n]), n >= 1, by 8 running maxima: LLVM leaves a float max reduction serial (it may not
    reorder one without "nnan"), one compare after another, each waiting out the last one's latency."""
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = row[0]
    n8 = n // 8 * 8
    for j in range(0, n8, 8):
        t0, t1, t2, t3 = max(t0, row[j]), max(t1, row[j + 1]), max(t2, row[j + 2]), max(t3, row[j + 3])
        t4, t5, t6, t7 = max(t4, row[j + 4]), max(t5, row[j + 5]), max(t6, row[j + 6]), max(t7, row[j + 7])
    for j in range(n8, n):
        t0 = max(t0, row[j])
    return max(max(max(t0, t1), max(t2, t3)), max(max(t4, t5), max(t6, t7)))


@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _softmax_tile(scores, n, n4, m, l, acc):
    """Turn scores[:, :n] into exp(score - running max), 0 up to n4; update m, l; rescale acc."""
    G, D = acc.shape
    for g in range(G):
        m_new = max(m[g], _row_max(scores[g], n))
        total = np.float32(0.0)
        for j in range(n):
            p = _exp_nonpositive(scores[g, j] - m_new)
            scores[g, j] = p
            total += p
        for j in range(n, n4):
            scores[g, j] = 0.0
        if l[g] > 0 and m_new > m[g]:
            alpha = np.exp(m[g] - m_new)
            l[g] = l[g] * alpha + total
            for d in range(D):
                acc[g, d] *= alpha
        else:
            l[g] += total
        m[g] = m_new


@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _accumulate_tile(p, pool, fp16, rows, v_rows, n4, acc, ahead, n_ahead, level):
    """acc[g] += sum_j p[g, j] * pool[rows[j] + v_rows] for j < n4 (a multiple of 4); meanwhile
    prefetches the V rows of the next tile (K rows ahead[:n_ahead])."""
    G, D = acc.shape
    for j in range(0, n4, 4):
        _prefetch_step(pool, ahead, j, n4, n_ahead, v_rows, level)
        r0, r1, r2, r3 = rows[j] + v_rows, rows[j + 1] + v_rows, rows[j + 2] + v_rows, rows[j + 3] + v_rows
        if G % 4 == 0:
            for g in range(0, G, 4):
                a0, a1, a2, a3 = p[g, j], p[g, j + 1], p[g, j + 2], p[g, j + 3]
                b0, b1, b2, b3 = p[g + 1, j], p[g + 1, j + 1], p[g + 1, j + 2], p[g + 1, j + 3]
                c0, c1, c2, c3 = p[g + 2, j], p[g + 2, j + 1], p[g + 2, j + 2], p[g + 2, j + 3]
                e0, e1, e2, e3 = p[g + 3, j], p[g + 3, j + 1], p[g + 3, j + 2], p[g + 3, j + 3]
                for d in range(D):
                    v0, v1 = to_f32(pool[r0, d], fp16), to_f32(pool[r1, d], fp16)
                    v2, v3 = to_f32(pool[r2, d], fp16), to_f32(pool[r3, d], fp16)
                    acc[g, d] += (a0 * v0 + a1 * v1) + (a2 * v2 + a3 * v3)
                    acc[g + 1, d] += (b0 * v0 + b1 * v1) + (b2 * v2 + b3 * v3)
                    acc[g + 2, d] += (c0 * v0 + c1 * v1) + (c2 * v2 + c3 * v3)
                    acc[g + 3, d] += (e0 * v0 + e1 * v1) + (e2 * v2 + e3 * v3)
        else:
            for g in range(G):
                a0, a1, a2, a3 = p[g, j], p[g, j + 1], p[g, j + 2], p[g, j + 3]
                for d in range(D):
                    v0, v1 = to_f32(pool[r0, d], fp16), to_f32(pool[r1, d], fp16)
                    v2, v3 = to_f32(pool[r2, d], fp16), to_f32(pool[r3, d], fp16)
                    acc[g, d] += (a0 * v0 + a1 * v1) + (a2 * v2 + a3 * v3)


@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _bf16_tile(q_bf16, q_f32, parts, pool, rows, v_rows, n, n4, scale, scores, m, l, acc, ahead, n_ahead, level,
               spread):
    """One tile through the hand-built loops of `_bf16_tiles` (bfloat16 pool, head_dim a multiple
    of 32, query heads a multiple of 4); prefetches the next tile's K rows while computing scores,
    its V rows while summing values, as `_score_tile` and `_accumulate_tile` do (`spread`: over
    every pass of the value sums, see `accumulate_tile`)."""
    G = acc.shape[0]
    for j in range(0, n4, 4):
        _prefetch_step(pool, ahead, j, n4, n_ahead, 0, level)
        for g in range(0, G, HEADS):
            score_step(q_bf16, q_f32, parts, g, pool, rows, j, scale, scores)
    _softmax_tile(scores, n, n4, m, l, acc)
    if level:  # the V rows past this tile's length; accumulate_step prefetches the others
        _prefetch_rows(pool, ahead, n, n_ahead, v_rows, level)
    for g in range(0, G, HEADS):
        accumulate_step(scores, g, pool, rows, v_rows, n, acc, ahead, n_ahead, level if g == 0 else 0, spread)


@njit(fastmath=FASTMATH, cache=True, _nrt=False)
def _amx_tile(qtiles, parts, pool, rows, v_rows, n, n4, scale, starts, kbuf, sbuf, scores, pbuf, vbuf, m, l, acc,
              acc_by_head, ahead, n_ahead, level):
    """One tile through the AMX tile products of `_amx_tiles` (bfloat16 pool, head_dim a multiple
    of 32, at most 8 query heads a kv head; rows padded to a multiple of 32). acc [16, D] holds two
    rows a head (high and low weights), acc_by_head the same memory as [G, 2D]; prefetches the next
    tile's K rows while scoring, its V rows while summing values."""
    G, D = scores.shape[0], pool.shape[1]
    n16 = (n + 15) // 16 * 16
    for j in range(0, n16, 16 * SCORE_GROUPS):
        groups = min(SCORE_GROUPS, (n16 - j) // 16)
        if level:
            _prefetch_rows(pool, ahead, j, min(j + 16 * groups, n_ahead), 0, level)
        for i in range(groups):
            first = j + 16 * i
            starts[i] = rows[first]
            for t in range(1, 16):
                if rows[first + t] != rows[first] + t:
                    starts[i] = -1
            if starts[i] < 0:
                for t in range(16):
                    for d in range(D):
                        kbuf[16 * i + t, d] = pool[rows[first + t], d]
        score_rows(pool, starts, kbuf, groups, qtiles, parts, sbuf, j)
    if level:
        _prefetch_rows(pool, ahead, n16, n_ahead, 0, level)
    for g in range(G):
        for j in range(n):
            scores[g, j] = sbuf[j, g] * scale
    _softmax_tile(scores, n, n4, m, l, acc_by_head)
    n32 = (n + 31) // 32 * 32
    weight_rows(scores, n, n32, pbuf)
    for j in range(0, n32, 32 * VALUE_CHUNKS):
        chunks = min(VALUE_CHUNKS, (n32 - j) // 32)
        for k in range(chunks):
            if level:
                _prefetch_rows(pool, ahead, j + 32 * k, min(j + 32 * k + 32, n_ahead), v_rows, level)
            interleave_values(pool, rows, j + 32 * k, v_rows, vbuf, k)
        add_values(pbuf, j, chunks, vbuf, acc)
    if level:
        _prefetch_rows(pool, ahead, n32, n_ahead, v_rows, level)


@njit(cache=True, _nrt=False, inline='always')
def _prefetch_step(pool, ahead, j, n4, n_ahead, offset, level):
    """At the 4-token step j of a tile of n4 tokens, prefetch the next tile's rows ahead[j:j + 4]
    + offset (the last step takes all that remain, when the next tile is the longer) into L1
    (level 1) or L2: every cache line of each row."""
    _prefetch_rows(pool, ahead, j, n_ahead if j + 4 >= n4 else min(j + 4, n_ahead), offset, level)


@njit(cache=True, _nrt=False, inline='always')
def _prefetch_rows(pool, ahead, start, stop, offset, level):
    """Prefetch every cache line of rows ahead[start:stop] + offset into L1 (level 1) or L2."""
    step = max(1, 64 // pool.itemsize)
    for k in range(start, stop):
        for d in range(0, pool.shape[1], step):
            if level == 1:
                prefetch_l1(pool, ahead[k] + offset, d)
            else:
                prefetch_l2(pool, ahead[k] + offset, d)


@njit(cache=True, _nrt=False)
def _fill_rows(rows, pos, last, tile, block_table, token_idx, indexed, b, h, bh, bs, slot_rows):
    """K row numbers of the tile starting at `pos` into rows; returns its token count n.

    A range tile stops at its block's end. rows[n:] up to the next multiple of 32 repeat the last
    row (read with weight 0).
    """
    if indexed:
        n = min(tile, last - pos)
        for j in range(n):
            tok = token_idx[b, h, pos + j]
            blk = tok // bs
            rows[j] = block_table[blk] * slot_rows + bh * bs + tok - blk * bs
    else:
        blk = pos // bs
        offset = pos - blk * bs
        n = min(tile, last - pos, bs - offset)
        first = block_table[blk] * slot_rows + bh * bs + offset
        for j in range(n):
            rows[j] = first + j
    for j in range(n, (n + 31) // 32 * 32):
        rows[j] = rows[n - 1]
    return n


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def attend_units(q, pool, fp16, block_table, token_idx, indexed, pieces, unit_begin, head_begin, n_parts, Hkv, bs,
                 tile, prefetch_next, prefetch_spread, inner, scale, out, lse, done, done_number):
    """Decode attention of q [B, Hq, D] over the tokens that `pieces` name; writes out and lse.

    pool [rows, D]: the pool's rows (uint16 bits when 16-bit, `fp16` telling which kind, else
    float32). pieces [P, 4] int64 (b * Hkv + h, first, last, part), from `build_units`: first/last
    are logical token positions, or positions in token_idx[b, h] when `indexed`. Unit u, one
    parallel task, works through pieces unit_begin[u] to unit_begin[u + 1] and leaves one partial
    (max, sum, unnormalized accumulator) per part; a head's parts are head_begin[bh] to
    head_begin[bh + 1]. `tile`: tokens per tile, a multiple of 4. `prefetch_next`: while a tile
    is computed, prefetch the next one's rows into L1 (1), L2 (2), or not (0); `prefetch_spread`: the
    hand-built loops spread the V rows' prefetches over every pass of their value sums. `inner`: LOOPS,
    BF16_LOOPS (`_bf16_tiles`; the caller checks that they apply: bfloat16 pool, D a multiple of 32,
    G a multiple of 4; the partial accumulators are then in split order) or AMX_TILES (`_amx_tiles`;
    bfloat16 pool, D a multiple of 32 up to 256, G at most 8; accumulators in `amx_index` order).
    Releases the GIL, so that the caller's other threads (GPU launches) run meanwhile. `done`: an
    int32 array of one element (or none) set to `done_number` once out and lse are written, with
    release ordering: a reader that polls it (the GPU) may read them then, before this returns.
    """
    B, Hq, D = q.shape
    G = Hq // Hkv
    v_rows = B * Hkv * bs
    slot_rows = 2 * v_rows
    part_m = np.empty((n_parts, G), np.float32)
    part_l = np.empty((n_parts, G), np.float32)
    part_acc = np.empty((n_parts, G, D), np.float32)
    amx = inner == AMX_TILES
    acc_rows = 16 if amx else G
    for u in prange(unit_begin.shape[0] - 1):
        qs = np.empty((G, D), np.float32)
        rows = np.empty(tile + 31, np.int64)
        ahead = np.empty(tile + 31, np.int64)
        scores = np.empty((G, tile + 31), np.float32)
        m = np.empty(G, np.float32)
        l = np.empty(G, np.float32)
        acc = np.empty((acc_rows, D), np.float32)
        acc_by_head = acc.reshape((acc_rows // 2, 2 * D))[:G] if amx else acc
        q_bf16 = np.empty((3, G, D // 2), np.uint32)
        q_f32 = np.empty((1, G, D), np.float32)
        amx_n = 16 if amx else 1  # the AMX loops' buffers, of one element otherwise
        qtiles = np.empty((3, D // 32 if amx else 1, amx_n, amx_n), np.uint32)
        starts = np.empty(SCORE_GROUPS, np.int64)
        kbuf = np.empty((SCORE_GROUPS * amx_n, D if amx else 1), np.uint16)
        sbuf = np.empty((tile + 31 if amx else 1, amx_n), np.float32)
        pbuf = np.zeros((amx_n, tile + 32 if amx else 1), np.uint16)
        vbuf = np.empty((VALUE_CHUNKS if amx else 1, D // 16 if amx else 1, amx_n, amx_n), np.uint32)
        parts = 1
        part = -1
        b = h = bh = 0
        for i in range(unit_begin[u], unit_begin[u + 1]):
            if pieces[i, 3] != part:
                if part >= 0:
                    _leave_partial(part, m, l, acc, amx, part_m, part_l, part_acc)
                part = pieces[i, 3]
                bh = pieces[i, 0]
                b = bh // Hkv
                h = bh - b * Hkv
                for g in range(G):
                    m[g] = -np.inf
                    l[g] = 0.0
                    for d in range(D):
                        qs[g, d] = q[b, h * G + g, d] * scale
                acc[:] = 0.0
                if inner == BF16_LOOPS:
                    parts = query_parts(q, b, h * G, G, q_bf16, q_f32)
                elif amx:
                    parts = query_tiles(q, b, h * G, G, q_bf16, qtiles)
            pos, last = pieces[i, 1], pieces[i, 2]
            n = _fill_rows(rows, pos, last, tile, block_table, token_idx, indexed, b, h, bh, bs, slot_rows)
            while True:
                n_ahead = 0
                if prefetch_next and pos + n < last:
                    n_ahead = _fill_rows(ahead, pos + n, last, tile, block_table, token_idx, indexed, b, h, bh, bs,
                                         slot_rows)
                n4 = (n + 3) // 4 * 4
                if inner == BF16_LOOPS:
                    _bf16_tile(q_bf16, q_f32, parts, pool, rows, v_rows, n, n4, np.float32(scale), scores, m, l, acc, ahead,
                               n_ahead, prefetch_next, prefetch_spread)
                elif amx:
                    _amx_tile(qtiles, parts, pool, rows, v_rows, n, n4, np.float32(scale), starts, kbuf, sbuf, scores, pbuf,
                              vbuf, m, l, acc, acc_by_head, ahead, n_ahead, prefetch_next)
                else:
                    _score_tile(qs, pool, fp16, rows, n4, scores, ahead, n_ahead, prefetch_next)
                    _softmax_tile(scores, n, n4, m, l, acc)
                    _accumulate_tile(scores, pool, fp16, rows, v_rows, n4, acc, ahead, n_ahead, prefetch_next)
                pos += n
                if pos >= last:
                    break
                if n_ahead:
                    rows, ahead, n = ahead, rows, n_ahead
                else:
                    n = _fill_rows(rows, pos, last, tile, block_table, token_idx, indexed, b, h, bh, bs, slot_rows)
        if part >= 0:
            _leave_partial(part, m, l, acc, amx, part_m, part_l, part_acc)
    for bh in prange(B * Hkv):
        b = bh // Hkv
        h = bh - b * Hkv
        first, stop = head_begin[bh], head_begin[bh + 1]
        for g in range(G):
            row = out[b, h * G + g]
            row[:] = 0.0
            if stop == first:
                lse[b, h * G + g] = -np.inf
                continue
            top = part_m[first, g]
            for t in range(first + 1, stop):
                top = max(top, part_m[t, g])
            total = np.float32(0.0)
            for t in range(first, stop):
                w = np.exp(part_m[t, g] - top)
                total += part_l[t, g] * w
                if inner == BF16_LOOPS:
                    for d in range(D):
                        row[d] += w * part_acc[t, g, split_index(d)]
                elif amx:
                    for d in range(D):
                        row[d] += w * part_acc[t, g, amx_index(d)]
                else:
                    for d in range(D):
                        row[d] += w * part_acc[t, g, d]
            inv = np.float32(1.0) / total
            for d in range(D):
                row[d] *= inv
            lse[b, h * G + g] = top + np.log(total)
    if done.shape[0]:
        store_release(done, 0, done_number)


@njit(cache=True, _nrt=False)
def _leave_partial(part, m, l, acc, amx, part_m, part_l, part_acc):
    """Keep a part's softmax state; under AMX a head's accumulator is the sum of its two rows."""
    G, D = part_acc.shape[1], part_acc.shape[2]
    for g in range(G):
        part_m[part, g] = m[g]
        part_l[part, g] = l[g]
        if amx:
            for d in range(D):
                part_acc[part, g, d] = acc[2 * g, d] + acc[2 * g + 1, d]
        else:
            for d in range(D):
                part_acc[part, g, d] = acc[g, d]


RANGES_OK, RANGE_OUTSIDE_TABLE, BLOCK_WITHOUT_SLOT = 0, 1, 2


@njit(cache=True)
def check_ranges(ranges, block_table, bs, n_slots):
    """(status, tokens) of ranges [B, Hkv, R, 2] over a block table: RANGES_OK, RANGE_OUTSIDE_TABLE
    (a non-empty range reaches outside [0, table length * bs)) or BLOCK_WITHOUT_SLOT (a block a
    range touches names no slot in [0, n_slots); blocks no range touches may name anything), and
    the ranges' total token count. One pass, where NumPy took a dozen calls for every kernel call."""
    limit = block_table.shape[0] * bs
    tokens = 0
    for b in range(ranges.shape[0]):
        for h in range(ranges.shape[1]):
            for r in range(ranges.shape[2]):
                start, end = np.int64(ranges[b, h, r, 0]), np.int64(ranges[b, h, r, 1])
                if end <= start:
                    continue
                if start < 0 or end > limit:
                    return RANGE_OUTSIDE_TABLE, 0
                for blk in range(start // bs, (end - 1) // bs + 1):
                    if block_table[blk] < 0 or block_table[blk] >= n_slots:
                        return BLOCK_WITHOUT_SLOT, 0
                tokens += end - start
    return RANGES_OK, tokens


@njit(cache=True)
def build_units(ranges, chunk):
    """Cut the tokens of ranges [B, Hkv, R, 2], taken in (row, head, range) order, into units of
    `chunk` tokens (the last may be shorter): equal shares of work whatever the heads' lengths.

    A unit spans range and head boundaries; it is cut into pieces, one per range it touches, and
    its pieces of one head form a part, whose partial result the merge combines with the head's
    other parts. Returns pieces [P, 4] int64 (b * Hkv + h, first, last, part), unit_begin [U + 1]
    and head_begin [B * Hkv + 1] (indices into pieces and into parts), and the number of parts.
    """
    B, Hkv, R = ranges.shape[0], ranges.shape[1], ranges.shape[2]
    n_ranges = 0
    total = 0
    for b in range(B):
        for h in range(Hkv):
            for r in range(R):
                n = ranges[b, h, r, 1] - ranges[b, h, r, 0]
                if n > 0:
                    n_ranges += 1
                    total += n
    n_units = (total + chunk - 1) // chunk
    pieces = np.empty((n_ranges + n_units, 4), np.int64)
    unit_begin = np.zeros(n_units + 1, np.int64)
    head_begin = np.empty(B * Hkv + 1, np.int64)
    p = 0
    part = -1
    unit = 0
    room = chunk
    part_head = -1
    part_unit = -1
    for b in range(B):
        for h in range(Hkv):
            bh = b * Hkv + h
            head_begin[bh] = part + 1
            for r in range(R):
                pos, end = np.int64(ranges[b, h, r, 0]), np.int64(ranges[b, h, r, 1])
                while pos < end:
                    take = min(end - pos, room)
                    if bh != part_head or unit != part_unit:
                        part += 1
                        part_head, part_unit = bh, unit
                    pieces[p, 0] = bh
                    pieces[p, 1] = pos
                    pieces[p, 2] = pos + take
                    pieces[p, 3] = part
                    p += 1
                    pos += take
                    room -= take
                    if room == 0:
                        unit += 1
                        unit_begin[unit] = p
                        room = chunk
    head_begin[B * Hkv] = part + 1
    if room < chunk:
        unit_begin[unit + 1] = p
    return pieces[:p], unit_begin, head_begin, part + 1
