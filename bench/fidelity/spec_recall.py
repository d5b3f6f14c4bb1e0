"""Attention-mass recall of hetero's speculation per layer, measured on the plain transformers model.

hetero's `speculative` mode predicts, for each decode step and layer i >= 1, which middle tokens
[lo, hi) of the context layer i's query needs, from layer i-1's attention input (hetero/speculate.py).
This meter asks the same `Speculator` the same question outside hetero's cache, and scores the answer
against the true attention:

1. One exact forward (SDPA, no cache) over [B, L] ids, with a forward pre-hook on every attention
   module. The hook gets the layer's attention input (the hidden state after its input norm) and
   RoPE's cos/sin, and computes the layer's post-RoPE keys of all L tokens and queries at the
   measured positions with `hetero.speculate.rotated_query_key`, as `calibrate` does.
2. The keys go to each speculator (`append_keys`), as hetero's cache hands them over in `update`.
3. For every measured position p (a decode step whose past is the p tokens before it) and layer
   i >= 1: `select(i, input of layer i-1 at p, p, lo, hi)` with [lo, hi) hetero's middle at that
   step (the sink and window are whole blocks: `Selection.middle`), then
   `hetero.speculate.attention_recall(true query, true keys, selection, span=(lo, hi))`: the share
   of the middle's attention probability the selected tokens cover (the issue's recall), and the
   share of the whole context's (sink, window and the token itself being always attended).

Layer 0 has no layer before it: hetero fetches its middle whole, so it has no speculation recall
(None). Every setting sharing a `partial_ratio` (and `min_partial_columns`) shares one calibration (the skew depends on nothing
else), and every setting is measured in the same forward.
"""

from __future__ import annotations

import torch

from selection import RecallMeter, Selection


class SpeculationRecall:
    """Recall meters of several speculation settings over one model.

    Args:
        model: the transformers causal LM (the same weights hetero loads).
        settings: name -> hetero.speculate.SpeculationSettings.
        sink, window, block: hetero's residency (tokens; whole blocks).
    """

    def __init__(self, model, settings: dict, sink: int, window: int, block: int):
        from hetero.attention import attention_modules
        from hetero.speculate import Speculator, calibrate

        self.model = model
        self.modules = attention_modules(model)
        self.residency = Selection("window", sink, window, 0, block)
        calibrated = {}
        self.speculators = {}
        for name, s in settings.items():
            columns = (s.partial_ratio, s.min_partial_columns)
            if columns not in calibrated:  # hetero.load calibrates exactly so (its default prompt)
                calibrated[columns] = calibrate(model, settings=s)
            self.speculators[name] = Speculator(model, calibrated[columns].skews, s)

    def middle(self, position: int) -> tuple[int, int]:
        r = self.residency
        return middle_span(r.sink, r.window, r.block, position)

    @torch.no_grad()
    def measure(self, ids: torch.Tensor, positions: list[int], meters: dict[str, RecallMeter],
                shares: dict[str, list] | None = None) -> None:
        """Add the recall at decode positions `positions` of `ids` [B, L] to `meters[name]` (whole-context
        recall and middle recall, per layer); `shares[name]` collects the selected share of each step."""
        from hetero.speculate import rotated_query_key

        b, length = ids.shape
        for spec in self.speculators.values():
            spec.begin(b, length)
        at = torch.tensor(positions, device=ids.device)
        previous = {}  # the last layer's attention input at the measured positions

        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            layer = module.layer_idx
            _, keys = rotated_query_key(module, hidden, cos, sin)
            queries, _ = rotated_query_key(module, hidden[:, at], cos[:, at], sin[:, at])  # [B, Hq, P, D]
            for spec in self.speculators.values():
                spec.append_keys(layer, keys)
            if layer > 0:
                self._score(layer, module.scaling, queries, keys, previous["hidden"], positions, meters, shares)
            previous["hidden"] = hidden[:, at]

        hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.modules]
        decoder = getattr(self.model, "model", self.model)
        try:
            decoder(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()

    def _score(self, layer, scale, queries, keys, hidden_before, positions, meters, shares) -> None:
        from hetero.speculate import attention_recall, selected_share

        b, hq, _, d = queries.shape
        kv_heads = keys.shape[1]
        for j, p in enumerate(positions):
            lo, hi = self.middle(p)
            if hi <= lo:
                continue  # no middle: hetero keeps everything on the GPU at this step
            query = queries[:, :, j]
            # The share of the whole causal context's attention (the token itself included) on the middle.
            logits = (query.float().view(b, kv_heads, hq // kv_heads, d) @ keys[:, :, : p + 1].float().mT) * scale
            middle_mass = logits.softmax(-1)[..., lo:hi].sum(-1).reshape(b, hq)
            for name, spec in self.speculators.items():
                idx, count = spec.select(layer, hidden_before[:, j : j + 1], p, lo, hi)
                middle = attention_recall(query, keys, idx, count, scale=scale, span=(lo, hi))
                meters[name].add(layer, 1 - middle_mass + middle_mass * middle, middle)
                if shares is not None:
                    shares.setdefault(name, []).append(selected_share(count, lo, hi) * (hi - lo) / p)


def middle_span(sink: int, window: int, block: int, position: int) -> tuple[int, int]:
    """hetero's middle [lo, hi) for a decode step with `position` tokens before it."""
    lo, hi = Selection("window", sink, window, 0, block).middle(torch.tensor([position]))
    return lo, int(hi[0])


def answer_positions(context: int, answer_tokens: int) -> list[int]:
    """The decode steps of an answer of `answer_tokens` tokens after a `context`-token prompt: its first
    token comes out of the prefill (exact), each later one from a step whose input sits at these positions."""
    return list(range(context, context + answer_tokens - 1))


def text_positions(context: int, scored: int, most: int) -> list[int]:
    """At most `most` of the teacher-forced positions [context - scored, context), evenly spread."""
    all_ = list(range(context - scored, context))
    if len(all_) <= most:
        return all_
    step = len(all_) / most
    return sorted({all_[int(i * step)] for i in range(most)})
