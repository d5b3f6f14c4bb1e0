"""Attention over pieces of the keys, merged by log-sum-exp, equals attention over all of them."""

import pytest
import torch

from hetero.partial_attention import PartialMerger, attend


def _reference(q, k, v, scale, allowed):
    """float64 attention; allowed [B, 1, Lq, S] bool."""
    G = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(G, dim=1)
    v = v.double().repeat_interleave(G, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("D,G", [(64, 1), (80, 4), (96, 8), (128, 4)])
def test_pieces_merge_to_the_whole(D, G):
    torch.manual_seed(D + G)
    B, Hkv, past, Lq = 2, 2, 131, 7
    S = past + Lq
    q = torch.randn(B, Hkv * G, Lq, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    valid = torch.rand(B, S) > 0.2
    pos = torch.arange(S)
    q_pos = pos[past:]
    allowed = valid[:, None, None, :] & (pos[None, :] <= q_pos[:, None])[None, None]
    scale = D**-0.5
    merger = PartialMerger()
    for lo, hi in [(0, 50), (50, 51), (51, 51), (51, past)]:
        sl = slice(lo, hi)
        merger.add(*attend(q, k[:, :, sl], v[:, :, sl], scale, pos[sl], None, valid[:, sl]))
    merger.add(*attend(q, k[:, :, past:], v[:, :, past:], scale, q_pos, q_pos, valid[:, past:]))
    out, lse = merger.result()
    expected = _reference(q, k, v, scale, allowed)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(lse).all()


def test_fully_masked_queries_get_zero_not_nan():
    q = torch.randn(1, 2, 3, 16)
    k, v = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    out, lse = attend(q, k, v, 0.25, torch.arange(5), None, torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    merger = PartialMerger()
    merger.add(out, lse)
    merger.add(out, lse)
    merged, _ = merger.result()
    assert not merged.isnan().any()


def test_sliding_window_limits_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    pos = torch.arange(20)
    q_pos = pos[16:]
    out, _ = attend(q, k, v, 0.25, pos, q_pos, None, sliding_window=5)
    allowed = ((pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - 5))[None, None]
    assert torch.allclose(out.double(), _reference(q, k, v, 0.25, allowed), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Lq,S,G", [(1, 4099, 4), (257, 1000, 8), (333, 333, 4)])
def test_flash_path_matches_the_plain_path(dtype, Lq, S, G):
    torch.manual_seed(Lq + S)
    q = torch.randn(2, 2 * G, Lq, 128, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, S, 128, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, S, 128, device="cuda", dtype=dtype)
    pos = torch.arange(S, device="cuda")
    q_pos = pos if Lq == S else None
    out, lse = attend(q, k, v, 128**-0.5, pos, q_pos)
    ref_out, ref_lse = attend(q.float(), k.float(), v.float(), 128**-0.5, pos, q_pos)
    assert (out - ref_out).abs().max() < 2e-2
    assert (lse - ref_lse).abs().max() < 2e-2
