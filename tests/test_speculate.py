"""Speculation (hetero.speculate): the skew keeps q·k, the partial scores rank tokens, the alpha rule
selects them within bounds, on tiny random-weight models on the CPU."""

import argparse
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen3Config

from hetero import ConfigError, OffloadConfig, UnsupportedModelError
from hetero import speculate as sp
from hetero.demo import small_config

from batches import left_padded


HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16


def _tiny_model(arch: str, seed: int = 1):
    if arch == "qwen3":
        config = Qwen3Config(vocab_size=256, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                             max_position_embeddings=4096, initializer_range=0.08, tie_word_embeddings=False)
    else:
        config = small_config(arch, layers=3, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, vocab=256)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny_model("llama")


@pytest.fixture(scope="module")
def speculator(llama):
    return sp.calibrate(llama, settings=sp.SpeculationSettings(partial_ratio=0.25, min_partial_columns=0))


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _decode_step(model, ids, mask):
    """Prefill all but the last token, decode it; each layer's attention input and probabilities of
    the decode step, and the keys the cache holds after it (positions as generate numbers them)."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = {}

    def capture(module, args, kwargs):
        inputs[module.layer_idx] = kwargs["hidden_states"]

    hooks = [m.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for m in model.model.layers]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1]).past_key_values
        out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], past_key_values=cache,
                    output_attentions=True)
    for hook in hooks:
        hook.remove()
    keys = [layer.keys for layer in cache.layers]
    return inputs, [a[:, :, 0] for a in out.attentions], keys


# The skew ----------------------------------------------------------------------------------------


def test_skew_is_orthogonal_and_keeps_every_score(speculator):
    q = _randn(3, KV_HEADS, 5, HEAD_DIM, seed=1)
    k = _randn(3, KV_HEADS, 37, HEAD_DIM, seed=2)
    for layer, skew in enumerate(speculator.skews):
        r = skew.rotation
        assert r.shape == (KV_HEADS, HEAD_DIM, HEAD_DIM) and skew.kept == 4, layer
        torch.testing.assert_close(r.mT @ r, torch.eye(HEAD_DIM).expand_as(r), atol=1e-5, rtol=0)
        torch.testing.assert_close((q @ r) @ (k @ r).mT, q @ k.mT, atol=1e-4, rtol=1e-5)


def test_skew_concentrates_low_rank_queries_into_the_kept_columns():
    """Queries and keys living in a random 2-D subspace: 2 kept columns of 16 carry all of q·k."""
    basis = torch.linalg.qr(_randn(HEAD_DIM, HEAD_DIM, seed=3))[0][:, :2]
    queries = (_randn(4, 200, 2, seed=4) * torch.tensor([3.0, 1.0])) @ basis.T + 1e-3 * _randn(4, 200, HEAD_DIM, seed=5)
    keys = _randn(2, 200, 2, seed=6) @ basis.T
    skew = sp.fit_skew(queries, keys, partial_ratio=2 / HEAD_DIM)
    assert skew.kept == 2
    full = queries.view(2, 400, HEAD_DIM) @ keys.mT
    partial = (queries.view(2, 400, HEAD_DIM) @ skew.partial) @ (keys @ skew.partial).mT
    torch.testing.assert_close(partial, full, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_all_columns_give_the_models_own_attention(arch):
    """partial_ratio 1: the speculated logits of a layer from its own input are its decode attention,
    left padding included (RoPE positions from the mask, as generate numbers them)."""
    model = _tiny_model(arch, seed=2)
    s = sp.calibrate(model, settings=sp.SpeculationSettings(partial_ratio=1.0))
    ids, mask = left_padded([37, 23, 30], seed=7)
    inputs, probs, keys = _decode_step(model, ids, mask)
    total = ids.shape[1]
    valid_from = (mask == 0).sum(-1).to(torch.int32)
    s.begin(batch=3, max_tokens=total + 5)
    for layer, k in enumerate(keys):
        s.append_keys(layer, k)
    for layer in range(1, len(keys)):
        logits = s.scores(layer, inputs[layer], total - 1, 0, total, valid_from)
        pad = torch.arange(total) < valid_from[:, None]
        got = logits.masked_fill(pad[:, None, :], -math.inf).softmax(-1)
        torch.testing.assert_close(got, probs[layer], atol=2e-5, rtol=1e-4)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(UnsupportedModelError, match="model: speculation does not support architecture 'gpt2'"):
        sp.calibrate(gpt2)


def test_calibration_prompt_is_deterministic_and_in_the_vocabulary():
    a, b = sp.calibration_ids(301, tokens=517), sp.calibration_ids(301, tokens=517)
    assert a.shape == (1, 517) and torch.equal(a, b)
    assert 4 <= int(a.min()) and int(a.max()) < 301

    def byte_tokenizer(text, add_special_tokens):
        return {"input_ids": list(text.encode())}

    text_ids = sp.calibration_ids(256, tokens=300, tokenizer=byte_tokenizer)
    source = Path(argparse.__file__).read_bytes()
    assert text_ids.shape == (1, 300) and bytes(text_ids[0].tolist()) == source[:300]


# Partial keys and selection through the speculator -----------------------------------------------


def test_keys_appended_in_chunks_score_as_keys_appended_at_once(speculator):
    keys = [_randn(2, KV_HEADS, 61, HEAD_DIM, seed=10 + layer) for layer in range(3)]
    hidden = _randn(2, 1, HIDDEN, seed=13)
    speculator.begin(batch=2, max_tokens=64)
    for layer, k in enumerate(keys):
        speculator.append_keys(layer, k)
    at_once = speculator.scores(2, hidden, 61, 0, 61)
    speculator.begin(batch=2, max_tokens=64)
    for start, end in ((0, 7), (7, 8), (8, 29), (29, 61)):
        for layer, k in enumerate(keys):
            speculator.append_keys(layer, k[:, :, start:end])
    # Equal up to rounding: a BLAS may block a product of 7 rows apart from one of 61 (bitwise equal on
    # a Zen 3 dev machine, one ulp apart on an Intel one).
    torch.testing.assert_close(speculator.scores(2, hidden, 61, 0, 61), at_once, rtol=1e-5, atol=1e-6)
    assert speculator.scores(1, hidden, 61, 5, 40).shape == (2, HEADS, 35)


def test_tokens_aligned_with_the_query_are_selected(llama):
    """Planted keys that score 100 under one query head each, among keys that score about 0."""
    batch, total, lo, hi = 2, 301, 17, 283
    group = HEADS // KV_HEADS
    s = sp.calibrate(llama, settings=sp.SpeculationSettings(alpha=5.0, min_tokens=0, max_tokens=0.5))
    hidden = _randn(batch, 1, HIDDEN, seed=20)
    q = s.query(1, hidden, total)
    keys = 0.05 * _randn(batch, KV_HEADS, total, HEAD_DIM, seed=21)
    planted = torch.randperm(hi - lo, generator=torch.Generator().manual_seed(22))[: batch * HEADS] + lo
    planted = planted.view(batch, KV_HEADS, group)
    scale = HEAD_DIM**-0.5
    for b in range(batch):
        for h in range(KV_HEADS):
            for g in range(group):
                query = q[b, h * group + g]
                keys[b, h, planted[b, h, g]] = query * 100 / (scale * query.dot(query))
    s.begin(batch, total + 1)
    s.append_keys(0, keys)
    s.append_keys(1, keys)
    token_idx, count = s.select(1, hidden, total, lo, hi)
    assert token_idx.dtype == torch.int32 and count.dtype == torch.int32
    assert token_idx.shape == (batch, KV_HEADS, min(total // 2, hi - lo)) and count.shape == (batch, KV_HEADS)
    assert torch.equal(count, torch.full((batch, KV_HEADS), group, dtype=torch.int32))
    assert torch.equal(token_idx[..., :group], planted.sort(-1).values.to(torch.int32))
    recall = sp.attention_recall(q, keys, token_idx, count, span=(lo, hi))
    assert recall.shape == (batch, HEADS) and bool((recall > 0.99).all())


def test_layer_zero_capacity_and_order_of_calls_are_checked(llama):
    s = sp.calibrate(llama, settings=sp.SpeculationSettings(min_partial_columns=0))
    keys = _randn(1, KV_HEADS, 9, HEAD_DIM, seed=30)
    with pytest.raises(RuntimeError, match="before begin"):
        s.append_keys(1, keys)
    s.begin(batch=1, max_tokens=12)
    s.append_keys(1, keys)
    with pytest.raises(RuntimeError, match="sized the partial keys for 12"):
        s.append_keys(1, keys)
    with pytest.raises(ValueError, match="layer 0 has no layer before it"):
        s.select(0, _randn(1, 1, HIDDEN, seed=31), 9, 2, 8)
    with pytest.raises(ValueError, match=r"span \[2, 10\) outside the 9 keys"):
        s.select(1, _randn(1, 1, HIDDEN, seed=31), 9, 2, 10)
    assert s.max_selected(1000) == 100 and s.kept_columns == 4
    assert s.partial_key_bytes(3, 1000, torch.bfloat16) == 2 * 3 * KV_HEADS * 1000 * 4 * 2


# The selection rule ------------------------------------------------------------------------------


def _reference_selection(scores, lo, alpha, min_count, width, valid_from=None):
    """Per KV head, by loops: the positions and count the rule should give."""
    b_n, h_n, _, length = scores.shape
    chosen = {}
    for b in range(b_n):
        first = 0 if valid_from is None else max(0, int(valid_from[b]) - lo)
        for h in range(h_n):
            s = scores[b, h, :, first:]
            if s.shape[-1] == 0:
                chosen[b, h] = []
                continue
            closeness = (s - s.max(-1, keepdim=True).values).max(0).values
            within = int((closeness > -alpha).sum())
            n = min(max(within, min(min_count, width)), width, length - first)
            best = closeness.argsort(descending=True)[:n]
            chosen[b, h] = sorted(int(t) + first + lo for t in best)
    return chosen


def _check_against_reference(scores, lo, alpha, min_count, width, valid_from=None):
    token_idx, count = sp.select_tokens(scores, lo, alpha, min_count, width, valid_from)
    hi = lo + scores.shape[-1]
    assert token_idx.shape == (*scores.shape[:2], width) and token_idx.dtype == torch.int32
    assert count.shape == scores.shape[:2] and count.dtype == torch.int32
    assert bool(((token_idx >= lo) & (token_idx < hi)).all())
    for (b, h), positions in _reference_selection(scores, lo, alpha, min_count, width, valid_from).items():
        n = int(count[b, h])
        assert token_idx[b, h, :n].tolist() == positions, (b, h)
    return token_idx, count


def test_alpha_rule_takes_the_union_of_each_heads_near_best():
    # One KV head, two query heads over 6 positions starting at 40; alpha 5.
    scores = torch.tensor([[[[10.0, 6.0, 5.5, 4.9, -3.0, 0.0],
                             [-9.0, -9.0, -9.0, -9.0, 2.0, -2.5]]]])
    token_idx, count = sp.select_tokens(scores, lo=40, alpha=5.0, min_count=0, width=6)
    # Head 0 keeps 10, 6, 5.5 (4.9 is 5.1 below); head 1 keeps 2.0 (-2.5 is 4.5 below: kept too).
    assert count.tolist() == [[5]]
    assert token_idx[0, 0, :5].tolist() == [40, 41, 42, 44, 45]


@pytest.mark.parametrize("alpha,min_count,width", [(5.0, 0, 97), (0.7, 13, 97), (9.0, 0, 11), (0.01, 200, 31)])
def test_selection_matches_the_rule_within_its_bounds(alpha, min_count, width):
    scores = 3 * _randn(3, 2, 3, 97, seed=40)
    token_idx, count = _check_against_reference(scores, 211, alpha, min_count, width)
    assert bool((count >= min(min_count, width)).all()) and bool((count <= width).all())
    beyond = torch.arange(width) >= count[..., None].long()
    assert bool((token_idx[beyond] == 211 + 97 - 1).all()), "padding past the count is the last candidate"


def test_max_bound_keeps_the_best():
    scores = _randn(2, 3, 2, 53, seed=41)
    scores[..., 7] += 0.5  # within alpha of everything: every token qualifies, only the best 5 stay
    _, count = _check_against_reference(scores, 0, 100.0, 0, 5)
    assert bool((count == 5).all())


def test_padding_is_never_selected():
    scores = _randn(3, 2, 2, 41, seed=42)
    valid_from = torch.tensor([30, 0, 61], dtype=torch.int32)  # lo = 20: row 2 is padding throughout
    token_idx, count = _check_against_reference(scores, 20, 0.01, 35, 41, valid_from)
    assert count[0].tolist() == [31, 31]  # min_tokens asks 35; only 31 positions are not padding
    assert count[1].tolist() == [35, 35]
    assert bool((token_idx[0, :, : int(count[0, 0])] >= 30).all())
    assert count[2].tolist() == [0, 0]


def test_attention_recall_against_a_direct_sum():
    q = _randn(2, HEADS, HEAD_DIM, seed=50)
    keys = _randn(2, KV_HEADS, 45, HEAD_DIM, seed=51)
    token_idx = torch.tensor([[[5, 9, 30, 44], [6, 6, 6, 6]], [[5, 12, 13, 13], [7, 8, 9, 10]]], dtype=torch.int32)
    count = torch.tensor([[3, 1], [3, 0]], dtype=torch.int32)
    recall = sp.attention_recall(q, keys, token_idx, count, span=(5, 40))
    group = HEADS // KV_HEADS
    for b in range(2):
        for h in range(HEADS):
            kv = h // group
            probs = (q[b, h] @ keys[b, kv, 5:40].T / math.sqrt(HEAD_DIM)).softmax(-1)
            picked = {int(t) - 5 for t in token_idx[b, kv, : int(count[b, kv])]}
            expected = float(sum(probs[t] for t in picked)) if picked else 0.0
            assert float(recall[b, h]) == pytest.approx(expected, abs=1e-6)
    everything = torch.arange(5, 40, dtype=torch.int32).expand(2, KV_HEADS, -1)
    full = sp.attention_recall(q, keys, everything, torch.full((2, KV_HEADS), 35, dtype=torch.int32), span=(5, 40))
    torch.testing.assert_close(full, torch.ones(2, HEADS))
    assert float(sp.selected_share(count, 5, 40)) == pytest.approx(7 / 4 / 35)


# Settings ------------------------------------------------------------------------------------------


def test_settings_defaults_match_the_offload_config():
    assert sp.SpeculationSettings.from_config(OffloadConfig()) == sp.SpeculationSettings()
    s = sp.SpeculationSettings(min_tokens=0.05, max_tokens=300.0)
    assert (s.min_count(1000), s.max_count(1000)) == (50, 300)
    assert (sp.SpeculationSettings().min_count(1001), sp.SpeculationSettings().max_count(1001)) == (100, 100)


@pytest.mark.parametrize("key,value,expected", [
    ("alpha", 0, r"alpha: got 0 \(int\), expected a number > 0"),
    ("alpha", True, r"alpha: got True \(bool\), expected a number > 0"),
    ("alpha", float("inf"), "alpha: got inf"),
    ("partial_ratio", 0.0, r"partial_ratio: got 0.0 \(float\), expected a number in \(0, 1\]"),
    ("partial_ratio", 1.5, "partial_ratio: got 1.5"),
    ("min_tokens", -3, "min_tokens: got -3 .*expected a token count >= 0 or a share"),
    ("max_tokens", 2.5, "max_tokens: got 2.5 .*expected a token count"),
    ("max_tokens", "10%", "max_tokens: got '10%'"),
    ("cpu_remainder", "some", "cpu_remainder: got 'some' .*'none', 'bounded', 'all'"),
])
def test_bad_settings_name_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        sp.SpeculationSettings(**{key: value})
    assert info.value.key == key


# Through the cache ---------------------------------------------------------------------------------


def test_cache_gathers_the_selection_and_the_cpu_the_rest_exactly(tmp_path):
    """With cpu_remainder "all" the speculative mode is exact: selection only moves work between tiers."""
    import hetero
    from hetero.config import MachineMemory, resolve_budgets
    from hetero.demo import save_random_model

    path = save_random_model(tmp_path, "llama", seed=1, layers=3, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, vocab=256)
    config = {"mode": "speculative", "block_size": 16, "sink_tokens": 16, "window_tokens": 32, "gpu_kv_bytes": "384KiB",
              "cpu_kv_bytes": "64MiB", "prefill_chunk_tokens": 96, "cpu_remainder": "all", "max_tokens": 0.3,
              "min_partial_columns": 0}
    model = hetero.load(path, config, device="cpu")
    speculator = sp.calibrate(model, settings=sp.SpeculationSettings.from_config(model.hetero.config))
    ids, mask = left_padded([301, 262], seed=60)
    new_tokens = 9
    budgets = resolve_budgets(model.hetero.config, MachineMemory.probe("cpu"))
    cache = hetero.HeteroCache(model.hetero.config, budgets, 3, ids.shape[1] + new_tokens, "cpu", speculator=speculator)
    generate = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(ids, past_key_values=cache, **generate)
        expected = AutoModelForCausalLM.from_pretrained(path).eval().generate(ids, **generate)
    cache.close()
    assert torch.equal(got, expected)
    stats = cache.stats
    assert 0 < stats.fetched_token_share < 1 and stats.bytes_read_by_cpu > 0


@pytest.mark.parametrize("ordered", [True, False])
def test_a_full_budget_skips_the_alpha_rule_and_selects_the_same(ordered):
    g = torch.Generator().manual_seed(31)
    scores, rank = torch.randn(2, 3, 4, 77, generator=g), torch.randn(2, 3, 77, generator=g)
    valid_from = torch.tensor([20, 0])
    fast = sp.select_tokens(scores, 5, 5.0, 13, 13, valid_from, ordered, rank=rank)
    alpha_rule = sp.select_tokens(scores, 5, math.inf, 0, 13, valid_from, ordered, rank=rank)
    assert all(torch.equal(a, b) for a, b in zip(fast, alpha_rule))


@pytest.mark.parametrize("padded", [False, True])
def test_a_selection_beside_a_held_one_takes_the_best_tokens_it_lacks(llama, padded):
    """With the layer's own query and a selection already fetched, `select` returns, best first,
    the tokens a fresh selection ranks highest among those not held, as many as the budget leaves."""
    batch, total, lo, hi = 2, 211, 9, 190
    s = sp.calibrate(llama, settings=sp.SpeculationSettings(min_tokens=40, max_tokens=40))
    keys = _randn(batch, KV_HEADS, total, HEAD_DIM, seed=41)
    s.begin(batch, total + 1)
    s.append_keys(0, keys)
    s.append_keys(1, keys)
    query = _randn(batch, HEADS, HEAD_DIM, seed=42)
    valid_from = torch.tensor([0, 60]) if padded else None
    held = torch.stack([torch.stack([torch.randperm(hi - lo, generator=torch.Generator().manual_seed(44 + r))[:30] + lo
                                     for r in range(KV_HEADS)]) for _ in range(batch)]).to(torch.int32)
    if padded:  # nothing before a row's first valid position is ever held
        held[1] = torch.stack([torch.randperm(hi - 60, generator=torch.Generator().manual_seed(50 + r))[:30] + 60
                               for r in range(KV_HEADS)]).to(torch.int32)
    held_count = torch.tensor([[30, 12], [0, 25]], dtype=torch.int32)
    fresh, fresh_count = s.select(1, None, total, lo, hi, valid_from, ordered=False, query=query)
    added, count = s.select(1, None, total, lo, hi, valid_from, ordered=False, query=query,
                            held=(held, held_count))
    assert torch.equal(count, (fresh_count - held_count).clamp_min(0))
    for b in range(batch):
        for h in range(KV_HEADS):
            kept = set(held[b, h, : held_count[b, h]].tolist())
            best_not_held = [t for t in fresh[b, h, : fresh_count[b, h]].tolist() if t not in kept]
            got = added[b, h, : count[b, h]].tolist()
            assert got == best_not_held[: len(got)] and not kept & set(got)
    with pytest.raises(ValueError, match="best first"):
        s.select(1, None, total, lo, hi, query=query, held=(held, held_count))
    with pytest.raises(ValueError, match="one of them"):
        s.scores(1, None, total, lo, hi)


def test_excluded_positions_are_never_selected_and_bound_the_count():
    g = torch.Generator().manual_seed(61)
    scores, rank = torch.randn(2, 3, 4, 50, generator=g), torch.rand(2, 3, 50, generator=g)
    excluded = torch.zeros(50, dtype=torch.bool)
    excluded[5:45] = True  # ten positions left, fewer than the width
    for ordered in (True, False):
        token_idx, count = sp.select_tokens(scores, 100, 5.0, 20, 20, torch.tensor([0, 103]), ordered, rank=rank,
                                            excluded=excluded)
        assert count.tolist() == [[10] * 3, [7] * 3]  # row 1 also pads its first three
        for b in range(2):
            for h in range(3):
                taken = token_idx[b, h, : count[b, h]] - 100
                assert not excluded[taken].any() and (taken >= (0, 3)[b]).all()


@pytest.mark.parametrize("dim,ratio,least,kept", [(128, 0.25, 32, 32), (64, 0.25, 32, 32), (16, 0.25, 32, 16),
                                                  (64, 0.25, 0, 16), (64, 0.75, 32, 48)])
def test_small_heads_keep_at_least_min_partial_columns(dim, ratio, least, kept):
    queries, keys = _randn(4, 50, dim, seed=80), _randn(2, 50, dim, seed=81)
    assert sp.fit_skew(queries, keys, ratio, least).kept == kept
