"""Log-sum-exp merge of partial attention results computed over disjoint token sets."""

from __future__ import annotations

import numpy as np
import torch


def merge_partials(outs, lses):
    """Merge P partials (outs [P, B, Hq, D], lses [P, B, Hq]) into the attention over their union.

    A partial with lse -inf (no token) weighs nothing; if all are -inf the result is out 0,
    lse -inf, never NaN. Accepts numpy arrays or torch CPU tensors and returns the same kind,
    float32.
    """
    is_torch = isinstance(outs, torch.Tensor)
    o = (outs.detach().cpu().numpy() if is_torch else np.asarray(outs)).astype(np.float64)
    s = (lses.detach().cpu().numpy() if is_torch else np.asarray(lses)).astype(np.float64)
    top = s.max(axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(s - top)  # exp(-inf) = 0: empty partials drop out
    total = w.sum(axis=0)
    weighted = np.where(w[..., None] > 0, o * w[..., None], 0.0).sum(axis=0)
    some = total > 0
    out = np.where(some[..., None], weighted / np.where(some, total, 1.0)[..., None], 0.0).astype(np.float32)
    with np.errstate(divide="ignore"):
        lse = np.where(some, top + np.log(np.where(some, total, 1.0)), -np.inf).astype(np.float32)
    if is_torch:
        return torch.from_numpy(out), torch.from_numpy(lse)
    return out, lse
