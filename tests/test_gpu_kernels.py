"""The Triton kernels against their float64 PyTorch references.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET),
at tiny sizes; the tests marked gpu run them on the GPU at full size, the gathers reading pinned
host memory over PCIe.
"""

import os
import subprocess
import sys

import pytest
import torch

from hetero.gpu_kernels import (
    DecodeLaunch, Segment, decode_attention, gather_blocks, gather_tokens, merge_partials, merge_two, reference,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty hands out NaN-filled floats, so any element a kernel leaves unwritten shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _pool(n_slots, B, Hkv, bs, D, dtype, device=DEV, pin=False):
    pool = torch.randn(n_slots, 2, B, Hkv, bs, D, dtype=torch.float32).to(dtype)
    return pool.pin_memory() if pin else pool.to(device)


def _sorted_indices(B, Hkv, N, n_tokens, device=DEV):
    rows = [torch.randperm(n_tokens)[:N].sort().values for _ in range(B * Hkv)]
    return torch.stack(rows).view(B, Hkv, N).int().to(device)


def _check_gather_tokens(pool, n_blocks, N, device):
    n_slots, _, B, Hkv, bs, D = pool.shape
    table = torch.randperm(n_slots)[:n_blocks].int().to(device)
    N = min(N, n_blocks * bs - 3)
    idx = _sorted_indices(B, Hkv, N, n_blocks * bs - 3, device)
    count = torch.randint(0, N + 1, (B, Hkv), dtype=torch.int32)
    count[0, 0], count[-1, -1] = 0, N
    count = count.to(device)
    out = torch.full((2, B, Hkv, N, D), float("nan"), dtype=pool.dtype, device=device)
    expected = reference.gather_tokens(pool, table, idx, count, out.clone())
    gather_tokens(pool, table, idx, count, out)
    assert torch.equal(out.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("dtype,D,bs", [(torch.bfloat16, 64, 16), (torch.float32, 80, 8), (torch.float16, 96, 4)])
def test_gather_tokens_matches_reference(dtype, D, bs):
    torch.manual_seed(D)
    _check_gather_tokens(_pool(9, 2, 3, bs, D, dtype), n_blocks=7, N=70, device=DEV)


def test_gather_blocks_matches_reference():
    torch.manual_seed(1)
    pool = _pool(9, 2, 3, 8, 80, torch.bfloat16)
    slots = torch.tensor([4, 0, 8, 4], dtype=torch.int32, device=DEV)
    out = torch.full((4, *pool.shape[1:]), float("nan"), dtype=pool.dtype, device=DEV)
    gather_blocks(pool, slots, out, chunk=1024)
    assert torch.equal(out, pool[slots.long()])


def _segments(B, Hkv, D, dtype, bs, n_blocks, dense_len, device=DEV):
    """A blocked permuted-view segment with a shuffled table, per-(b, h) lengths and left padding,
    a dense window with per-row lengths, an empty one and a one-token one."""
    n_slots = n_blocks + 3
    pool = _pool(n_slots, B, Hkv, bs, D, dtype, device)
    table = torch.randperm(n_slots)[:n_blocks].int().to(device)
    cap = n_blocks * bs
    length = torch.randint(cap // 2, cap + 1, (B, Hkv), dtype=torch.int32)
    length[0, 0] = cap - 1  # not a multiple of bs
    start = torch.randint(0, bs + 5, (B,), dtype=torch.int32)
    blocked = Segment(pool[:, 0].permute(1, 2, 0, 3, 4), pool[:, 1].permute(1, 2, 0, 3, 4),
                      length=length.to(device), start=start.to(device), block_table=table)
    kv = torch.randn(2, B, Hkv, dense_len, D).to(dtype).to(device)
    dense_length = torch.randint(1, dense_len + 1, (B,), dtype=torch.int32).to(device)
    dense = Segment(kv[0], kv[1], length=dense_length)
    empty = Segment(kv[0, :, :, :0], kv[1, :, :, :0])
    one = Segment(kv[0, :, :, :1], kv[1, :, :, :1])
    return [blocked, dense, empty, one]


def _check_attention(q, segments, scale, atol, launch=None, reference_segments=None):
    out, lse = decode_attention(q, segments, scale, launch)
    ref_out, ref_lse = reference.decode_attention(q, reference_segments or segments, scale, compute_dtype=torch.float64)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=atol, rtol=0)
    assert (out.double() - ref_out).abs().max().item() <= atol * max(1.0, ref_out.abs().max().item())


@pytest.mark.parametrize("D,G,dtype,bs", [
    (64, 1, torch.bfloat16, 16), (80, 4, torch.float16, 8), (96, 8, torch.float32, 4), (128, 4, torch.bfloat16, 16),
])
@pytest.mark.parametrize("launch", [
    None,
    DecodeLaunch(block_n=16, min_split=16, programs_per_sm=8),
    DecodeLaunch(block_n=16, min_split=16, programs_per_sm=8, fused_merge=False),
], ids=["default", "many-splits", "many-splits-merge-kernel"])
def test_decode_attention_over_mixed_segments(poisoned_empty, D, G, dtype, bs, launch):
    torch.manual_seed(D + G)
    B, Hkv = 2, 2
    segments = _segments(B, Hkv, D, dtype, bs, n_blocks=5, dense_len=19)
    q = (2 * torch.randn(B, Hkv * G, D)).to(dtype).to(DEV)
    _check_attention(q, segments, D**-0.5, atol=2e-3, launch=launch)
    _check_attention(q, segments[::-1], D**-0.5, atol=2e-3, launch=launch)  # the split segment last


def test_decode_attention_fp32_query_over_bf16_kv(poisoned_empty):
    torch.manual_seed(3)
    segments = _segments(1, 2, 64, torch.bfloat16, 16, n_blocks=3, dense_len=5)[:2]
    q = torch.randn(1, 4, 64, device=DEV)
    _check_attention(q, segments, 0.125, atol=2e-3)


def test_decode_attention_rows_with_no_tokens_get_zero_and_neg_inf(poisoned_empty):
    torch.manual_seed(4)
    B, Hkv, G, D = 2, 2, 2, 64
    kv = torch.randn(2, B, Hkv, 40, D, device=DEV)
    q = torch.randn(B, Hkv * G, D, device=DEV)
    length = torch.tensor([[0, 40], [17, 0]], dtype=torch.int32, device=DEV)
    start = torch.tensor([0, 17], dtype=torch.int32, device=DEV)  # row 1 has start == length for head 0
    segments = [Segment(kv[0], kv[1], length=length, start=start), Segment(kv[0, :, :, :0], kv[1, :, :, :0])]
    out, lse = decode_attention(q, segments, D**-0.5)
    empty = torch.tensor([[True, True, False, False], [True, True, True, True]], device=DEV)
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    _check_attention(q, segments, D**-0.5, atol=1e-4)
    out, lse = decode_attention(q, [], D**-0.5)
    assert torch.isneginf(lse).all() and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("launch", [None, DecodeLaunch(block_n=16, min_split=16, programs_per_sm=8)],
                         ids=["tiles-across-blocks", "two-tiles-per-block"])
def test_decode_attention_splits_long_rows(poisoned_empty, launch):
    """Rows longer than one program's share are split across programs and merged; tiles that span
    blocks and tiles that lie within one (a table entry per tile) both read the right rows."""
    torch.manual_seed(5)
    B, Hkv, G, D, bs = 1, 1, 4, 64, 32
    pool = _pool(20, B, Hkv, bs, D, torch.float16)
    table = torch.randperm(20)[:18].int().to(DEV)
    seg = Segment(pool[:, 0].permute(1, 2, 0, 3, 4), pool[:, 1].permute(1, 2, 0, 3, 4), block_table=table,
                  length=torch.tensor([18 * bs - 5], dtype=torch.int32, device=DEV))
    q = torch.randn(B, Hkv * G, D).half().to(DEV)
    _check_attention(q, [seg], D**-0.5, atol=2e-3, launch=launch)


@pytest.mark.parametrize("tma", [True, False], ids=["tensor-memory-accelerator", "thread-loads"])
def test_decode_attention_reads_no_nan_from_rows_outside_the_valid_ones(poisoned_empty, tma):
    """Whole tiles are read (by the tensor memory accelerator, or by masked thread loads) though a
    row's tokens may end inside one or start after its first token: NaN in the rows around the
    valid ones, and in slots no table names, never reaches the result."""
    import importlib
    module = importlib.import_module("hetero.gpu_kernels.decode_attention")
    torch.manual_seed(8)
    B, Hkv, G, D, bs = 2, 2, 4, 80, 32
    pool = _pool(7, B, Hkv, bs, D, torch.float16)
    table = torch.tensor([5, 0, 6, 2], dtype=torch.int32, device=DEV)
    length = torch.tensor([[bs * 4 - 7, bs + 3], [bs * 3 + 1, bs * 4]], dtype=torch.int32, device=DEV)
    start = torch.tensor([0, 11], dtype=torch.int32, device=DEV)
    for b in range(B):
        pool[table[0].item(), :, b, :, : start[b]] = float("nan")
        for h in range(Hkv):
            n = length[b, h].item()
            if n < 4 * bs:
                pool[table[n // bs].item(), :, b, h, n % bs :] = float("nan")
    pool[[1, 3, 4]] = float("nan")
    kv = torch.randn(2, B, Hkv, 45, D).half().to(DEV)
    kv[:, :, :, 40:] = float("nan")
    segments = [Segment(pool[:, 0].permute(1, 2, 0, 3, 4), pool[:, 1].permute(1, 2, 0, 3, 4), length=length,
                        start=start, block_table=table),
                Segment(kv[0], kv[1], length=40)]
    clean = [Segment(seg.k.nan_to_num(), seg.v.nan_to_num(), seg.length, seg.start, seg.block_table) for seg in segments]
    q = torch.randn(B, Hkv * G, D).half().to(DEV)
    module._plans.clear()
    _check_attention(q, segments, D**-0.5, atol=2e-3, launch=DecodeLaunch(block_n=16, min_split=16, tma=tma),
                     reference_segments=clean)  # the reference's masked product would be 0 * NaN
    assert [plan.tma for plan in module._plans.values()] == [tma, tma]


def test_decode_attention_int_length_and_counters_left_at_zero(poisoned_empty):
    """A segment's length as an int (one end for every row) matches the tensor form; the fused
    merge's arrival counters, kept across calls, are back at zero after every call."""
    import importlib
    module = importlib.import_module("hetero.gpu_kernels.decode_attention")
    torch.manual_seed(7)
    B, Hkv, G, D, bs = 2, 2, 4, 64, 8
    pool = _pool(9, B, Hkv, bs, D, torch.bfloat16)
    table = torch.randperm(9)[:6].int().to(DEV)
    k, v = pool[:, 0].permute(1, 2, 0, 3, 4), pool[:, 1].permute(1, 2, 0, 3, 4)
    q = torch.randn(B, Hkv * G, D).to(torch.bfloat16).to(DEV)
    launch = DecodeLaunch(block_n=16, min_split=16, programs_per_sm=8)
    for n in (6 * bs - 3, 100, 0, 1):
        seg = Segment(k, v, length=n, block_table=table)
        as_tensor = Segment(k, v, length=torch.full((B,), n, dtype=torch.int32, device=DEV), block_table=table)
        out, lse = decode_attention(q, [seg], D**-0.5, launch)
        ref_out, ref_lse = decode_attention(q, [as_tensor], D**-0.5, launch)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
        _check_attention(q, [seg], D**-0.5, atol=2e-3, launch=launch)
        for counters in module._arrival_counters.values():
            assert not counters.any()


def test_merge_partials_is_exact_and_neg_inf_safe(poisoned_empty):
    torch.manual_seed(6)
    P, B, Hq, D = 19, 2, 3, 80
    outs = torch.randn(P, B, Hq, D, device=DEV)
    lses = 3 * torch.randn(P, B, Hq, device=DEV)
    lses[:, 0, 0] = float("-inf")  # a row empty in every partial
    lses[1:, 1, 2] = float("-inf")  # a row in one partial only
    outs[:, 0, 0] = float("nan")  # an empty partial's output is never read
    out, lse = merge_partials(outs, lses)
    ref_out, ref_lse = reference.merge_partials(outs.double(), lses.double())
    assert torch.equal(out[0, 0], torch.zeros(D, device=DEV)) and lse[0, 0] == float("-inf")
    assert torch.allclose(out.double(), ref_out, atol=1e-5) and torch.allclose(lse.double(), ref_lse, atol=1e-5)
    out_a, lse_a = outs[2].clone(), lses[2].clone()
    merge_two(out_a, lse_a, outs[3], lses[3])
    ref_out, ref_lse = reference.merge_partials(outs[2:4].double(), lses[2:4].double())
    assert torch.equal(out_a[0, 0], torch.zeros(D, device=DEV))
    assert torch.allclose(out_a.double(), ref_out, atol=1e-5) and torch.allclose(lse_a.double(), ref_lse, atol=1e-5)


def test_launches_build_hook_metadata_only_while_a_hook_is_registered():
    """Triton 3.6 keeps an empty chain of launch hooks, never None: the direct launches must tell
    an empty chain from a registered hook, or they would build the hook's metadata on every call."""
    import triton

    from hetero.gpu_kernels._dispatch import launch_hooked

    chain = triton.knobs.runtime.launch_enter_hook
    assert not launch_hooked()
    hook = lambda metadata: None  # noqa: E731
    chain.add(hook)
    try:
        assert launch_hooked()
    finally:
        chain.remove(hook)
    assert not launch_hooked()


def test_default_launch_takes_the_merge_kernel_only_for_few_long_rows(monkeypatch):
    """With the tensor memory accelerator, batch 1 over 64K tokens and more is GPU-bound, and faster
    with the merge kernel; shorter calls and many rows (batch 8) merge in the last program."""
    import importlib
    module = importlib.import_module("hetero.gpu_kernels.decode_attention")
    monkeypatch.setattr(module, "_has_tma", lambda device: True)
    q1, q8 = torch.zeros(1, 32, 128, dtype=torch.bfloat16), torch.zeros(8, 32, 128, dtype=torch.bfloat16)
    fused, merge_kernel = module.default_launches(q1)
    assert fused.fused_merge and not merge_kernel.fused_merge
    assert module.default_launch(q1, 8, 32768) == fused
    assert module.default_launch(q1, 8, 65536) == module.default_launch(q1, 8, 131072) == merge_kernel
    assert module.default_launch(q8, 8, 32768) == module.default_launch(q8, 8, 131072) == fused
    assert module.default_launch(q1.float(), 8, 131072) == module._THREAD_LAUNCHES.default


def test_segment_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        Segment(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError):
        Segment(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), block_table=torch.zeros(1, dtype=torch.int32))


# ---- on the GPU, at full size ----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 80)])
def test_gpu_gather_tokens_from_pinned_host_memory(dtype, D):
    torch.manual_seed(10)
    bs, n_blocks = 16, 2048  # 32K tokens
    pool = _pool(n_blocks + 7, 2, 8, bs, D, dtype, pin=True)
    _check_gather_tokens(pool, n_blocks, N=3277, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_gather_blocks_from_pinned_host_memory():
    torch.manual_seed(11)
    pool = _pool(300, 2, 8, 16, 128, torch.bfloat16, pin=True)
    slots = torch.randperm(300)[:257].int().cuda()
    out = torch.full((257, *pool.shape[1:]), float("nan"), dtype=pool.dtype, device="cuda")
    gather_blocks(pool, slots, out)
    assert torch.equal(out.cpu(), pool[slots.long().cpu()])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("D,G,dtype", [(128, 4, torch.bfloat16), (64, 8, torch.float16), (80, 1, torch.bfloat16),
                                       (96, 4, torch.float32), (256, 2, torch.bfloat16)])
@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("bs", [16, 256])
def test_gpu_decode_attention_32k(poisoned_empty, D, G, dtype, fused_merge, bs):
    torch.manual_seed(12)
    B, Hkv = 2, 8 if D <= 128 else 2
    segments = _segments(B, Hkv, D, dtype, bs, n_blocks=32768 // bs, dense_len=700, device="cuda")
    q = (2 * torch.randn(B, Hkv * G, D)).to(dtype).cuda()
    atol = 1e-3 if dtype == torch.float32 else 1e-2
    launch = DecodeLaunch(fused_merge=fused_merge)
    for _ in range(3):  # the merge's arrival counting must hold up run after run
        _check_attention(q, segments, D**-0.5, atol=atol, launch=launch)
        _check_attention(q, segments[:1], D**-0.5, atol=atol, launch=launch)


def test_cpu_tensors_fall_back_to_reference_without_interpreter():
    """With TRITON_INTERPRET unset, CPU tensors take the PyTorch path (a fresh process: the
    interpreter choice is made at import)."""
    script = """
import torch
from hetero.gpu_kernels import Segment, decode_attention, gather_blocks, gather_tokens, merge_partials, reference
from hetero.gpu_kernels._dispatch import INTERPRET
assert not INTERPRET
torch.manual_seed(0)
pool = torch.randn(5, 2, 1, 2, 4, 64)
table = torch.tensor([3, 0, 4], dtype=torch.int32)
idx = torch.tensor([[[0, 5, 11], [1, 2, 3]]], dtype=torch.int32)
count = torch.tensor([[3, 2]], dtype=torch.int32)
out = torch.full((2, 1, 2, 3, 64), float("nan"))
gather_tokens(pool, table, idx, count, out)
assert torch.equal(out[:, 0, 0, 1], pool[0, :, 0, 0, 1])  # token 5: block 1 -> slot 0, row 1
assert out[:, 0, 1, 2].isnan().all()  # past head 1's count
blocks = gather_blocks(pool, table, torch.empty(3, 2, 1, 2, 4, 64))
assert torch.equal(blocks, pool[table.long()])
q = torch.randn(1, 4, 64)
seg = Segment(pool[:, 0].permute(1, 2, 0, 3, 4), pool[:, 1].permute(1, 2, 0, 3, 4), block_table=table)
o, l = decode_attention(q, [seg], 0.125)
ro, rl = reference.decode_attention(q, [seg], 0.125, compute_dtype=torch.float64)
assert o.dtype == torch.float32 and torch.allclose(o.double(), ro, atol=1e-5)
m, ml = merge_partials(torch.stack([o, o]), torch.stack([l, l]))
assert torch.allclose(m, o, atol=1e-6) and torch.allclose(ml, l + 0.6931472, atol=1e-5)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
