"""The `split` mode's GPU share: probed at load, refined from the first decode steps, or fixed."""

import math

import pytest
import torch

from hetero.pipeline import Pipeline, WorkTimes
from hetero.split_tuner import SplitTuner, ceiling_share, measured_share, refine_share

from batches import left_padded
from test_stream_exact import SMALL, _hetero, _reference, model_dir  # noqa: F401  (fixture)


def _times(gpu_bytes, gpu_s, cpu_bytes, cpu_s, gap_s=0.0):
    return WorkTimes(copy_bytes=gpu_bytes, copy_seconds=gpu_s, host_bytes=cpu_bytes, host_seconds=cpu_s,
                     host_gap_seconds=gap_s)


def test_refine_moves_toward_the_balance_the_timings_measured():
    # The GPU moved 40 bytes in 1 s (40 B/s), the CPU 60 bytes in 3 s (20 B/s): balanced at 2/3.
    skewed = _times(40, 1.0, 60, 3.0)
    assert measured_share(skewed) == pytest.approx(2 / 3)
    assert refine_share(0.4, [skewed]) == pytest.approx(2 / 3), "the first window that tells sets the share"
    assert refine_share(0.4, [skewed, skewed]) == pytest.approx(2 / 3)
    # At the balance both sides take equally long: nothing moves.
    assert refine_share(2 / 3, [_times(2, 1.0, 1, 1.0)]) == pytest.approx(2 / 3)
    assert refine_share(0.4, []) == 0.4


def test_the_cpu_sides_gap_moves_work_to_the_gpu():
    # 40 B/s and 20 B/s over 100 bytes: 2.5 s for all of it over PCIe, 5 s on the CPU. With 1 s a
    # window lost between the CPU's parts, both end together at r * 2.5 = (1 - r) * 5 + 1: r = 0.8.
    with_gap = _times(40, 1.0, 60, 3.0, gap_s=1.0)
    assert measured_share(with_gap) == pytest.approx(0.8)
    assert measured_share(_times(40, 1.0, 60, 3.0, gap_s=0.0)) == pytest.approx(2 / 3)
    assert measured_share(_times(40, 1.0, 60, 3.0, gap_s=10.0)) == 1.0, "a gap longer than the PCIe side: all on the GPU"
    assert measured_share(_times(40, 1.0, 60, 3.0, gap_s=math.nan)) is None
    assert measured_share(_times(40, 1.0, 60, 3.0, gap_s=-1.0)) is None


def test_refine_is_not_thrown_by_one_odd_window():
    skewed = _times(40, 1.0, 60, 3.0)  # 2/3
    odd = _times(1, 1.0, 1000, 1.0)  # a stalled copy: ~0.001
    assert refine_share(0.4, [skewed, odd, skewed, skewed]) == pytest.approx(2 / 3)
    assert refine_share(0.4, [odd, skewed, skewed]) == pytest.approx(2 / 3), "an odd first window lasts a step"


def test_refine_clamps_to_a_share():
    assert refine_share(1.5, []) == 1.0
    assert refine_share(-0.5, [WorkTimes()]) == 0.0
    assert 0.0 <= refine_share(0.5, [_times(100, 1.0, 1, 100.0, gap_s=50.0)]) <= 1.0
    assert 0.0 <= refine_share(1.0, [_times(1, 1.0, 1, 1.0)] * 3) <= 1.0


@pytest.mark.parametrize("times", [
    _times(0, 0.0, 60, 3.0),  # the GPU fetched nothing (share 0, or its copies still in flight)
    _times(40, 1.0, 0, 0.0),  # the CPU attended over nothing
    _times(40, 0.0, 60, 3.0),  # a zero time
    _times(40, -1.0, 60, 3.0),
    _times(40, math.nan, 60, 3.0),
    _times(40, 1.0, 60, math.inf),
])
def test_refine_ignores_timings_that_do_not_tell(times):
    assert measured_share(times) is None
    assert refine_share(0.37, [times]) == 0.37
    assert refine_share(0.37, [times, _times(1, 1.0, 1, 1.0)]) == pytest.approx(0.5)


def test_tuner_by_default_skips_only_the_first_window_and_runs_the_next_step_at_its_balance_without_its_gap():
    tuner = SplitTuner(0.87)
    # The prefill and the first decode step, whose CPU side waited on the host: its rates, not its gap.
    assert tuner.observe(_times(40, 1.0, 60, 3.0, gap_s=1.0)) == pytest.approx(2 / 3)
    assert tuner.refined_steps == 0 and tuner.start == 0.87 and tuner.told
    assert tuner.observe(_times(50, 1.0, 50, 1.0)) == pytest.approx(0.5)  # the second step's counts alone
    assert tuner.refined_steps == 1
    untold = SplitTuner(0.87)
    assert untold.observe(WorkTimes()) == 0.87 and not untold.told, "a first window that does not tell leaves the start"
    longer = SplitTuner(0.87, skip=2)
    longer.observe(_times(40, 1.0, 60, 3.0))
    assert longer.observe(_times(1, 1.0, 1000, 1.0)) == pytest.approx(2 / 3)
    assert longer.told, "a later skipped window does not unsay the first one's balance"


def test_tuner_skips_the_first_steps_then_refines_a_few_then_holds():
    tuner = SplitTuner(0.4, skip=2, steps=3)
    skewed = _times(40, 1.0, 60, 3.0)  # balance at 2/3
    assert tuner.observe(WorkTimes()) == 0.4  # prefill and the first step: not counted
    assert tuner.observe(_times(1, 1.0, 1000, 1.0)) == 0.4, "only the first window sets the next step's share"
    shares = [tuner.observe(skewed) for _ in range(3)]
    assert shares == pytest.approx([2 / 3] * 3)
    assert tuner.done and tuner.refined_steps == 3
    assert tuner.observe(_times(1000, 1.0, 1, 1.0)) == shares[-1]  # fixed from now on
    assert tuner.start == 0.4 and tuner.share == shares[-1]


def test_tuner_reports_each_sides_median_rate_over_the_windows_that_told():
    tuner = SplitTuner(0.5, skip=1, steps=4)
    assert tuner.rates() is None
    tuner.observe(_times(1, 1.0, 1, 1.0))  # skipped: not counted
    for times in (_times(40, 1.0, 60, 3.0, 0.1), WorkTimes(), _times(30, 1.0, 90, 3.0, 0.3), _times(50, 1.0, 3, 3.0, 0.2)):
        tuner.observe(times)
    assert tuner.rates() == pytest.approx((40.0, 20.0, 0.2))


def test_a_following_tuner_balances_the_last_windows_after_its_first_steps():
    slow_cpu, fast_cpu = _times(40, 1.0, 60, 3.0), _times(50, 1.0, 50, 1.0)  # balanced at 2/3 and 1/2
    tuner = SplitTuner(0.5, skip=0, steps=2, follow=3)
    for _ in range(2):
        tuner.observe(fast_cpu)
    assert not tuner.done, "a following tuner never holds"
    assert tuner.observe(slow_cpu) == pytest.approx(0.5)  # two of three windows still say 1/2
    assert tuner.observe(slow_cpu) == pytest.approx(2 / 3)
    for _ in range(3):
        tuner.observe(slow_cpu)
    assert len(tuner.windows) == 3 and tuner.share == pytest.approx(2 / 3)
    assert tuner.observe(fast_cpu) == pytest.approx(2 / 3) and tuner.observe(fast_cpu) == pytest.approx(0.5)
    held = SplitTuner(0.5, skip=0, steps=2, follow=0)
    for times in (fast_cpu, fast_cpu, slow_cpu, slow_cpu):
        held.observe(times)
    assert held.done and held.share == pytest.approx(0.5), "without following, the first steps' share holds"
    with pytest.raises(ValueError, match="follow"):
        SplitTuner(0.5, follow=-1)


def test_tuner_counts_steps_whose_timings_do_not_tell_without_moving():
    tuner = SplitTuner(0.5, skip=0, steps=2)
    assert tuner.observe(WorkTimes()) == 0.5
    assert tuner.observe(WorkTimes()) == 0.5
    assert tuner.done and tuner.refined_steps == 0


def test_pipeline_times_the_rings_copies_and_the_host_jobs():
    pipeline = Pipeline("cpu")
    assert pipeline.take_work_times() == WorkTimes()  # timing off: nothing measured
    pipeline.time_work()
    ring = pipeline.fetch_ring(2, 4, (2, 1, 2, 16, 8), torch.float32)
    source = torch.randn(3, 2, 1, 2, 16, 8)
    ring.release(ring.submit(source))
    job = pipeline.run_on_host(pipeline.fence_here(), lambda: (torch.ones(1),), work_bytes=1234)
    pipeline.host_result(job)
    times = pipeline.take_work_times()
    assert times.copy_bytes == source.numel() * 4 and times.copy_seconds > 0
    assert times.host_bytes == 1234 and times.host_seconds > 0
    assert times.host_gap_seconds == 0, "a window's first job has no gap before it"
    assert pipeline.take_work_times() == WorkTimes()  # taken: the next window starts empty
    pipeline.close()


def test_pipeline_times_the_host_workers_wait_for_the_next_job():
    import time

    pipeline = Pipeline("cpu")
    pipeline.time_work()
    for _ in range(3):  # the host thread takes each result, then works 50 ms before queueing the next job
        pipeline.host_result(pipeline.run_on_host(pipeline.fence_here(), lambda: (torch.ones(1),), work_bytes=1))
        time.sleep(0.05)
    times = pipeline.take_work_times()
    assert times.host_bytes == 3 and 0.1 <= times.host_gap_seconds < 0.5, "two gaps of about 50 ms"
    assert times.host_idle_seconds >= times.host_gap_seconds, "idle from one job's end to the next one's start"
    pipeline.close()


class _LandsLate:
    """A fence whose synchronize waits 50 ms: a query still on its way when the worker takes the job."""

    def synchronize(self):
        import time

        time.sleep(0.05)


def test_pipeline_times_the_workers_idle_wait_for_queries_queued_ahead():
    pipeline = Pipeline("cpu")
    pipeline.time_work()
    jobs = [pipeline.run_on_host(_LandsLate(), lambda: (torch.ones(1),), work_bytes=1) for _ in range(3)]
    for job in jobs:  # all queued ahead, as with GPU-side waits: no gap, only the waits for the queries
        pipeline.host_result(job)
    times = pipeline.take_work_times()
    assert times.host_gap_seconds == 0
    assert 0.1 <= times.host_idle_seconds < 0.5, "two waits of about 50 ms after the first job"
    pipeline.close()


def test_tuner_reports_the_workers_median_idle_time_over_the_windows_that_told():
    tuner = SplitTuner(0.5, skip=0, steps=3)
    assert tuner.idle_seconds() is None
    for idle in (0.3, 0.1, 0.2):
        tuner.observe(WorkTimes(copy_bytes=1, copy_seconds=1.0, host_bytes=1, host_seconds=1.0, host_idle_seconds=idle))
    assert tuner.idle_seconds() == pytest.approx(0.2)


def _split_config(ratio):
    return {**SMALL, "gpu_kv_bytes": "384KiB", "mode": "split", "split_ratio": ratio}


def test_auto_without_cuda_takes_the_ceilings_balance(tmp_path):
    import hetero
    from hetero.demo import save_random_model

    path = save_random_model(tmp_path, "llama", seed=1, layers=2, hidden=64, heads=4, kv_heads=2, vocab=256)
    model = hetero.load(path, _split_config("auto"), device="cpu")
    assert model.hetero.split_probe is None, "no probe without CUDA"
    assert model.hetero.gpu_share() == pytest.approx(ceiling_share()) == pytest.approx(54 / (54 + 76))
    cache = model.hetero.new_cache(64)
    assert cache.split_tuner is None, "without CUDA the share is not refined unless asked"
    cache.close()


def test_a_fixed_ratio_is_never_changed(model_dir):
    ids, mask = left_padded([211, 97, 150], seed=3)
    got, model = _hetero(model_dir, ids, mask, 10, _split_config(0.5))
    model.hetero.refine_split = True  # even when refinement is asked for
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
    stats = model.hetero.last_stats
    assert stats.split_share_start == stats.split_share == 0.5
    assert model.hetero.split_share_refined is None and model.hetero.gpu_share() == 0.5


def test_refined_split_matches_transformers_and_is_remembered(model_dir, monkeypatch):
    ids, mask = left_padded([211, 97, 150], seed=3)
    expected = _reference(model_dir, ids, mask, 10)
    import hetero
    import hetero.api

    # Every window counted: on this CPU device the first window's balance (copies by memcpy against the
    # kernel on two cores) can leave the CPU side nothing to attend, and so nothing to time, after it.
    monkeypatch.setattr(hetero.api, "SplitTuner", lambda share: SplitTuner(share, skip=0))

    model = hetero.load(model_dir, _split_config("auto"), device="cpu")
    model.hetero.refine_split = True  # a CPU device: refine from its timings all the same
    runtime = model.hetero
    for run in range(2):
        start = runtime.gpu_share()
        with torch.no_grad():
            got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                 min_new_tokens=10, pad_token_id=0)
        assert torch.equal(got, expected), f"generation {run}"
        stats = runtime.last_stats
        if getattr(model.config, "sliding_window", None) is not None:
            assert stats.split_share == 1.0  # such models stream
            return
        assert stats.split_share_start == pytest.approx(start)
        assert 0.0 <= stats.split_share <= 1.0
        if run == 0:
            assert stats.bytes_read_by_cpu > 0, "the CPU must have attended over part of the KV"
        assert runtime.split_share_refined == stats.split_share, "the next generation starts from it"
        if run == 0:  # the second starts refined and measures no more
            assert stats.split_pcie_bytes_per_s > 0 and stats.split_cpu_bytes_per_s > 0
            assert stats.split_cpu_idle_s >= stats.split_cpu_gap_s >= 0
            assert "idle" in stats.summary()
    assert "GPU share" in stats.summary()


class _ScriptedTuner:
    """Changes the share at every step boundary, wherever the timings point: exactness must hold."""

    shares = [0.0, 1.0, 0.3, 0.8, 0.5, 0.0, 0.6]

    def __init__(self, share):
        self.start = self.share = share
        self.refined_steps = 0
        self.done = False
        self.seen = []

    @property
    def told(self):
        return self.refined_steps > 0

    def rates(self):
        return None

    def idle_seconds(self):
        return None

    def observe(self, times):
        self.seen.append(times)
        self.share = self.shares[len(self.seen) % len(self.shares)]
        self.refined_steps += 1
        return self.share


def test_share_changing_every_step_still_matches_transformers(model_dir, monkeypatch):
    import hetero
    import hetero.api

    monkeypatch.setattr(hetero.api, "SplitTuner", _ScriptedTuner)
    ids, mask = left_padded([211, 97, 150], seed=3)
    expected = _reference(model_dir, ids, mask, 10)
    model = hetero.load(model_dir, _split_config("auto"), device="cpu")
    model.hetero.refine_split = True
    if not model.hetero.splits_auto():
        pytest.skip("a sliding-window model streams")
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             min_new_tokens=10, pad_token_id=0)
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_read_by_cpu > 0
    assert model.hetero.split_share_refined in _ScriptedTuner.shares


def test_the_load_time_generation_that_loads_decode_kernels_leaves_no_trace(model_dir, monkeypatch):
    import hetero
    import hetero.api

    monkeypatch.setattr(hetero.api, "SplitTuner", _ScriptedTuner)  # told at its first window: remembered if run
    model = hetero.load(model_dir, _split_config("auto"), device="cpu")
    runtime = model.hetero
    assert not runtime.decode_kernels_loaded, "on the CPU no kernel loads lazily: prepare does not run it"
    runtime.refine_split, runtime.last_stats = True, "the last run's"
    hetero.api.load_decode_kernels(model)
    assert runtime.decode_kernels_loaded
    assert runtime.last_stats == "the last run's" and runtime.refine_split is True
    assert runtime.split_share_refined is None, "four tokens' timings must not set the next generation's share"
    ids, mask = left_padded([211, 97, 150], seed=3)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             min_new_tokens=10, pad_token_id=0)
    assert torch.equal(got, _reference(model_dir, ids, mask, 10))


def test_cpu_probe_times_the_kernel_after_starting_its_threads():
    from hetero.bandwidth_probe import cpu_attention
    from hetero.cache import KVLayout

    layout = KVLayout(1, 1, 2, 64, 16, torch.bfloat16)
    assert cpu_attention(layout, 4, nbytes=1 << 20) > 1e7  # bytes/s: it ran and timed real work


@pytest.mark.gpu
def test_probe_gives_a_share_between_the_two_sides():
    import time

    from hetero import cpu_kernels
    from hetero.bandwidth_probe import probe
    from hetero.cache import KVLayout
    from hetero.split_tuner import balanced_share

    cpu_kernels.warmup((torch.bfloat16,))
    started = time.perf_counter()
    found = probe(torch.device("cuda"), KVLayout(1, 1, 8, 128, 16, torch.bfloat16), 32)
    seconds = time.perf_counter() - started
    assert found is not None and found.pcie_h2d > 1e9 and found.cpu_attention > 1e8
    assert 0.0 < balanced_share(found.pcie_h2d, found.cpu_attention) < 1.0
    assert seconds < 3.0, f"the probe took {seconds:.2f} s"


@pytest.mark.gpu
def test_split_on_cuda_probes_at_load_and_refines(tmp_path):
    import hetero
    from hetero.demo import save_random_model

    path = save_random_model(tmp_path, "llama", seed=7, layers=4, hidden=256, heads=8, kv_heads=2, vocab=256)
    config = {"mode": "split", "block_size": 64, "sink_tokens": 64, "window_tokens": 128, "gpu_kv_bytes": "2MiB",
              "cpu_kv_bytes": "1GiB", "split_ratio": "auto"}
    model = hetero.load(path, config, dtype=torch.bfloat16, device="cuda")
    runtime = model.hetero
    assert runtime.split_probe is not None
    probed = runtime.gpu_share()
    assert 0.0 < probed < 1.0
    ids = torch.randint(1, 256, (2, 1800), generator=torch.Generator().manual_seed(8)).cuda()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    stats = runtime.last_stats
    assert stats.split_share_start == pytest.approx(probed)
    assert 0.0 <= stats.split_share <= 1.0 and stats.bytes_read_by_cpu > 0
    assert runtime.split_share_refined == stats.split_share
