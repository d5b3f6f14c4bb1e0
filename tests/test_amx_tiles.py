"""The AMX tile path of the CPU kernel: its operand layouts here (a NumPy model of the tile product),
and the kernel against the float64 reference where the CPU runs AMX."""

import numpy as np
import pytest
import torch
from numba import njit

from hetero.cpu_kernels import attention, host_decode_attention, host_decode_attention_indexed, reference
from hetero.cpu_kernels._amx_tiles import amx_index, interleave_values, query_tiles, weight_rows

from test_cpu_kernels import _assert_close, _case, _random_ranges


@njit(cache=False)
def _interleave(pool, rows, j, v_rows, vbuf, k):
    interleave_values(pool, rows, j, v_rows, vbuf, k)


def _floats(bits):
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _pairs(words):
    """uint32 words of two bfloat16 as float64 [..., 2] (low half first)."""
    return np.stack([_floats(words & np.uint32(0xFFFF)), _floats(words >> np.uint32(16))], axis=-1)


def _tile_product(a_bits, b_words):
    """What tdpbf16ps adds: a [16, 32] bfloat16 bits times b [16, 16] words of bfloat16 pairs."""
    a = _floats(a_bits).reshape(16, 16, 2)  # [row, pair, half]
    return np.einsum("mkh,knh->mn", a, _pairs(b_words))


def _bf16_bits(rng, shape):
    return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


@pytest.mark.parametrize("D", [32, 96, 256])
def test_interleaved_values_and_weight_rows_give_weighted_sums_in_amx_order(D):
    rng = np.random.default_rng(D)
    pool = _bf16_bits(rng, (200, D))
    rows = rng.permutation(90)[:40].astype(np.int64)
    vbuf = np.zeros((2, D // 16, 16, 16), np.uint32)
    _interleave(pool, rows, 8, 100, vbuf, 1)
    assert (vbuf[0] == 0).all()
    vbuf = vbuf[1]
    G, n = 3, 29
    probs = rng.random((G, 40)).astype(np.float32)
    pbuf = np.full((16, 48), 7, np.uint16)
    weight_rows(probs, n, 32, pbuf)
    acc = np.zeros((16, D))
    for group in range(D // 16):
        acc[:, group * 16:(group + 1) * 16] = _tile_product(pbuf[:, :32], vbuf[group])
    values = _floats(pool[rows[8:8 + n] + 100])  # [n, D]
    want = probs[:, :n].astype(np.float64) @ values
    order = [amx_index(d) for d in range(D)]
    assert sorted(order) == list(range(D))
    got = acc[0::2, order][:G] + acc[1::2, order][:G]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(values).max())
    assert (pbuf[2 * G:, :32] == 7).all()  # rows past 2G are left as they were (the kernel zeroes them once)


def test_query_tiles_score_keys_with_every_part():
    rng = np.random.default_rng(3)
    D, G = 96, 5
    q = (rng.standard_normal((2, 10, D)) * 7).astype(np.float32)
    qtiles = np.full((3, D // 32, 16, 16), 9, np.uint32)
    parts = query_tiles(q, 1, 5, G, np.zeros((3, G, D // 2), np.uint32), qtiles)
    assert parts == 3
    keys = _bf16_bits(rng, (16, D))
    scores = sum(_tile_product(keys[:, 32 * c:32 * (c + 1)], qtiles[p, c]) for p in range(parts) for c in range(D // 32))
    want = _floats(keys) @ q[1, 5:10].astype(np.float64).T
    np.testing.assert_allclose(scores[:, :G], want, rtol=1e-6, atol=1e-5)
    assert (scores[:, G:] == 0).all()


amx = pytest.mark.skipif(not attention.amx_ready(), reason="needs a CPU with AMX bfloat16 and Linux's tile permission")


@amx
@pytest.mark.parametrize("D,G,bs,tile,chunk", [(128, 4, 16, 128, None), (64, 1, 24, 20, 37), (256, 8, 16, 36, 45),
                                                (96, 2, 40, 64, 51)])
def test_amx_tiles_match_reference(monkeypatch, D, G, bs, tile, chunk):
    """Ranges and token lists, at odd tiles and chunks, with scores growing along the sequence
    (online rescales), bfloat16 and float32 queries (one and several query parts)."""
    monkeypatch.setattr(attention, "AMX_TILES", True)
    monkeypatch.setattr(attention, "TILE_TOKENS", tile)
    rng = np.random.default_rng(D + G)
    q, pool, table = _case(rng, "bfloat16", D, G, bs=bs, n_blocks=20)
    n_tokens = table.numel() * bs
    growth = 1 + torch.linspace(0, 3, n_tokens).reshape(-1, 1, 1, bs, 1)
    pool[table.long(), 0] = (pool[table.long(), 0].float() * growth).to(torch.bfloat16)
    ranges = _random_ranges(rng, 2, 2, 3, n_tokens - 1)
    idx = np.stack([rng.permutation(n_tokens)[:150] for _ in range(4)]).reshape(2, 2, 150).astype(np.int32)
    count = np.array([[150, 0], [77, 3]], np.int32)
    for query in (q, q.to(torch.bfloat16).float()):
        got = host_decode_attention(query, pool, table, ranges, D**-0.5, chunk=chunk)
        _assert_close(*got, *reference.decode_attention(query, pool, table, ranges, D**-0.5), "bfloat16")
        got = host_decode_attention_indexed(query, pool, table, idx, count, D**-0.5, chunk=chunk)
        _assert_close(*got, *reference.decode_attention_indexed(query, pool, table, idx, count, D**-0.5), "bfloat16")


def test_amx_tiles_forced_where_they_cannot_run_is_an_error(monkeypatch):
    if attention.amx_ready():
        pytest.skip("this machine runs AMX")
    monkeypatch.setattr(attention, "AMX_TILES", True)
    q, pool, table = _case(np.random.default_rng(1), "bfloat16", 64, 4, n_blocks=3)
    with pytest.raises(RuntimeError, match="AMX_TILES"):
        host_decode_attention(q, pool, table, torch.tensor([0, 9], dtype=torch.int32).expand(2, 2, 1, 2).contiguous(), 0.1)
