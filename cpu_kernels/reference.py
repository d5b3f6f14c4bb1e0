"""Plain PyTorch float64 versions of this package's kernels: the tests' oracle.

The pool is a torch tensor [n_slots, 2, B, Hkv, bs, D] of a floating dtype; a host pool of
bfloat16 bits held as uint16 numpy goes through `pool_from_bits` first.
"""

from __future__ import annotations

import numpy as np
import torch


def pool_from_bits(bits: np.ndarray) -> torch.Tensor:
    """torch.bfloat16 tensor with the same bits as a uint16 numpy array."""
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def attention_over_tokens(q, pool, block_table, tokens_per_head, scale):
    """float64 decode attention of q [B, Hq, D] over tokens_per_head[b][h] (1-D token positions).

    Returns (out [B, Hq, D], lse [B, Hq]) float64; a head with no token gets out 0, lse -inf.
    """
    q = torch.as_tensor(q).double()
    pool = torch.as_tensor(pool)
    block_table = torch.as_tensor(block_table).long()
    B, Hq, D = q.shape
    Hkv, bs = pool.shape[3], pool.shape[4]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            tok = torch.as_tensor(tokens_per_head[b][h]).long()
            if tok.numel() == 0:
                continue
            slot, row = block_table[tok // bs], tok % bs
            k = pool[slot, 0, b, h, row].double()
            v = pool[slot, 1, b, h, row].double()
            scores = q[b, h * G : (h + 1) * G] @ k.T * scale
            lse[b, h * G : (h + 1) * G] = torch.logsumexp(scores, dim=-1)
            out[b, h * G : (h + 1) * G] = torch.softmax(scores, dim=-1) @ v
    return out, lse


def decode_attention(q, pool, block_table, ranges, scale):
    """Reference of `host_decode_attention`: ranges [B, Hkv, R, 2] of [start, end) positions."""
    ranges = np.asarray(ranges)
    B, Hkv = ranges.shape[:2]
    tokens = [[_positions(ranges[b, h]) for h in range(Hkv)] for b in range(B)]
    return attention_over_tokens(q, pool, block_table, tokens, scale)


def _positions(head_ranges):
    return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in head_ranges] + [np.zeros(0, np.int64)])


def decode_attention_indexed(q, pool, block_table, token_idx, token_count, scale):
    """Reference of `host_decode_attention_indexed`: the first token_count[b, h] of token_idx[b, h]."""
    token_idx, token_count = np.asarray(token_idx), np.asarray(token_count)
    tokens = [
        [token_idx[b, h, : token_count[b, h]] for h in range(token_idx.shape[1])] for b in range(token_idx.shape[0])
    ]
    return attention_over_tokens(q, pool, block_table, tokens, scale)


def merge_partials(outs, lses):
    """float64 log-sum-exp merge of outs [P, B, Hq, D], lses [P, B, Hq]."""
    outs, lses = torch.as_tensor(outs).double(), torch.as_tensor(lses).double()
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse).nan_to_num(0.0)
    return (outs * weights[..., None]).sum(dim=0), lse
