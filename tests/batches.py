"""Input batches the exactness tests share."""

import torch


def left_padded(lengths: list[int], seed: int, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids in 1..vocab-1 for rows of `lengths` tokens, padded on the left with 0 to the longest,
    and the attention mask (1 = a token)."""
    width = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask
