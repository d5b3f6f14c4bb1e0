"""Host jobs whose tensors come back to the GPU: the result, the errors, and on CUDA a host thread that
goes on while the compute stream waits on the GPU for the job's flag."""

import threading
import time

import pytest
import torch

from hetero.gpu_kernels import host_flag
from hetero.gpu_kernels.host_flag import copy_when_raised, wait_for_flag
from hetero.pipeline import Pipeline

CUDA = torch.cuda.is_available()


def _int32(value: int) -> torch.Tensor:
    t = torch.tensor([value], dtype=torch.int32)
    return t.pin_memory() if CUDA else t


def test_a_raised_flag_lets_the_stream_through():
    flag, gave_up = _int32(5), _int32(0)
    wait_for_flag(flag, 3, gave_up)
    wait_for_flag(flag, 5, gave_up)
    if CUDA:
        torch.cuda.synchronize()
    assert int(gave_up[0]) == 0


def test_a_wait_that_outlasts_its_polls_goes_on_and_says_so():
    flag, gave_up = _int32(2), _int32(0)
    wait_for_flag(flag, 3, gave_up, max_polls=100)
    if CUDA:
        torch.cuda.synchronize()
    assert int(gave_up[0]) == 3  # one more than the flag's value it last read


def test_a_flag_that_is_no_single_int32_is_refused():
    with pytest.raises(ValueError, match="flag must be one int32"):
        wait_for_flag(torch.zeros(2, dtype=torch.int32), 1, _int32(0))
    with pytest.raises(ValueError, match="gave_up must be one int32"):
        wait_for_flag(_int32(1), 1, torch.zeros(1, dtype=torch.int64))


def _words(n: int) -> torch.Tensor:
    t = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32)
    return t.pin_memory() if CUDA else t


@pytest.mark.parametrize("interpreted", [True, False])
@pytest.mark.parametrize("n", [1, 37, host_flag.COPY_WORDS + 3])  # more than one step of the copy too
def test_a_raised_flag_lets_the_copy_of_what_it_guards_through(monkeypatch, interpreted, n):
    if not CUDA:
        monkeypatch.setattr(host_flag, "INTERPRET", interpreted)  # the kernel, or the copy made at once
    source, gave_up = _words(n), _int32(0)
    out = torch.zeros(n, dtype=torch.int32, device="cuda" if CUDA else "cpu")
    copy_when_raised(_int32(4), 4, gave_up, source, out)
    assert int(gave_up[0]) == 0
    torch.testing.assert_close(out.cpu(), source, rtol=0, atol=0)


@pytest.mark.parametrize("interpreted", [True, False])
def test_a_copy_whose_wait_outlasts_its_polls_leaves_the_output_and_says_so(monkeypatch, interpreted):
    if not CUDA:
        monkeypatch.setattr(host_flag, "INTERPRET", interpreted)
    gave_up = _int32(0)
    out = torch.full((9,), 7, dtype=torch.int32, device="cuda" if CUDA else "cpu")
    copy_when_raised(_int32(2), 3, gave_up, _words(9), out, max_polls=100)
    assert int(gave_up[0]) == 3
    assert out.cpu().eq(7).all()


def test_a_copy_of_other_words_is_refused():
    with pytest.raises(ValueError, match="source must be a contiguous 1-d int32"):
        copy_when_raised(_int32(1), 1, _int32(0), torch.zeros(4), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="differ in length: 4 against 5"):
        copy_when_raised(_int32(1), 1, _int32(0), _words(4), torch.zeros(5, dtype=torch.int32))


def test_a_mailbox_lays_its_slots_side_by_side_in_one_buffer_of_words(monkeypatch):
    from hetero import pipeline as pl

    monkeypatch.setattr(torch, "empty", _unpinned(torch.empty))
    monkeypatch.setattr(torch, "zeros", _unpinned(torch.zeros))
    values = (torch.randn(2, 3, 5), torch.randn(7).to(torch.bfloat16), torch.randn(1, 2))
    box = pl._Mailbox.new(tuple((v.shape, v.dtype) for v in values))
    for slot, v in zip(box.slots, values, strict=True):
        assert slot.data_ptr() % 16 == 0
        slot.copy_(v)
    for got, want in zip(box.views(box.words.clone()), values, strict=True):  # as the GPU's copy of the words
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _unpinned(make):
    return lambda *a, pin_memory=False, **kw: make(*a, **kw)


def test_a_job_with_known_returns_gives_its_tensors_and_its_errors():
    pipeline = Pipeline("cuda" if CUDA else "cpu")
    # Slots of several dtypes and sizes that are no multiple of a word, side by side in one mailbox.
    a, b, c = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1), torch.randn(3, 3).to(torch.bfloat16)
    returns = ((a.shape, torch.float32), (b.shape, torch.float32), (c.shape, torch.bfloat16))
    for _ in range(3):  # a mailbox is reused once the GPU has emptied it
        job = pipeline.run_on_host(pipeline.fence_here(), lambda: (a, b, c), returns=returns)
        for got, want in zip(pipeline.host_result(job), (a, b, c), strict=True):
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)

    def broken():
        raise ArithmeticError("the CPU part failed")

    job = pipeline.run_on_host(pipeline.fence_here(), broken, returns=returns)
    with pytest.raises(ArithmeticError, match="CPU part failed"):
        pipeline.host_result(job)
        pipeline.synchronize()  # on CUDA the GPU goes past the raised flag; the error shows next
        pipeline.check_host_jobs()
    pipeline.close()


def test_a_job_that_posts_itself_writes_the_mailbox_and_raises_its_flag():
    """`posts`: on CUDA `fn` gets the mailbox (`into`) and fills it; elsewhere it returns as usual."""
    pipeline = Pipeline("cuda" if CUDA else "cpu")
    a, b = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1)
    returns = ((a.shape, torch.float32), (b.shape, torch.float32))
    calls = []

    def part(into=None):
        calls.append(into is not None)
        if into is None:
            return a, b
        (slot_a, slot_b), flag, number = into
        slot_a.copy_(a)
        slot_b.copy_(b)
        flag[0] = number  # what the kernel does without the GIL, after writing its output
        return slot_a, slot_b

    for _ in range(3):
        job = pipeline.run_on_host(pipeline.fence_here(), part, returns=returns, posts=True)
        for got, want in zip(pipeline.host_result(job), (a, b), strict=True):
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    assert calls == [CUDA] * 3
    pipeline.close()


def test_host_attention_writes_into_given_tensors_and_raises_the_flag_when_told():
    import numpy as np

    from hetero.host_attention import attend_host_blocks

    slab = torch.randn(5, 2, 2, 2, 16, 64).to(torch.bfloat16)
    table = np.array([3, 0, 4, 1], np.int32)
    query = torch.randn(2, 8, 1, 64)
    want = attend_host_blocks(query, slab, table, 1, 4, 0.125, torch.tensor([0, 20]))
    out, lse, flag = torch.full((2, 8, 1, 64), 9.0), torch.full((2, 8, 1), 9.0), torch.zeros(1, dtype=torch.int32)
    got = attend_host_blocks(query, slab, table, 1, 4, 0.125, torch.tensor([0, 20]), into=((out, lse), flag, 6))
    assert got[0] is out and got[1] is lse and int(flag[0]) == 6
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only a decode query"):
        attend_host_blocks(torch.randn(2, 8, 3, 64), slab, table, 1, 4, 0.125, None, into=((out, lse), flag, 7))
    with pytest.raises(ValueError, match="int32 array of one element"):
        attend_host_blocks(query, slab, table, 1, 4, 0.125, None, into=((out, lse), torch.zeros(2, dtype=torch.int32), 7))


@pytest.mark.gpu
def test_the_host_thread_goes_on_while_the_gpu_waits_for_the_job():
    pipeline = Pipeline("cuda")
    release = threading.Event()
    value = torch.randn(4, 8, 1, 128)
    (value.cuda() * 2).cpu()  # load the multiply's kernel now: loading it later would wait for the GPU

    def slow():
        release.wait(timeout=30)
        return (value,)

    job = pipeline.run_on_host(pipeline.fence_here(), slow, returns=((value.shape, torch.float32),))
    (on_gpu,) = pipeline.host_result(job)  # returns at once: the wait is queued on the GPU
    doubled = on_gpu * 2
    assert not job.future.done()
    release.set()
    torch.testing.assert_close(doubled.cpu(), value * 2, rtol=0, atol=0)
    pipeline.close()


@pytest.mark.gpu
@pytest.mark.parametrize("spins", [0, 40_000])  # polls in Python, or first without the GIL (HOST_WAIT_SPINS)
def test_a_host_thread_waits_for_copies_to_the_host_without_a_cuda_call(monkeypatch, spins):
    from hetero import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "HOST_WAIT_SPINS", spins)
    monkeypatch.setattr(Pipeline, "_NUMBERS", 3)  # the numbers wrap around twice
    pipeline = Pipeline("cuda")
    for i in range(7):
        value = torch.randn(5, 7, device="cuda") + i
        (host,), fence = pipeline.to_host(value, numbered=True)
        fence.synchronize()
        assert fence.done() and fence.number == i + 1
        torch.testing.assert_close(host, value.cpu(), rtol=0, atol=0)
    pipeline.close()


def test_the_host_thread_frees_a_jobs_inputs_not_the_worker():
    """Freeing a pinned tensor or an event is a CUDA call: made by the worker while the host thread
    synchronizes the device behind a GPU wait for that worker, it could stall both."""
    freed_on = []

    class Input:
        def __del__(self):
            freed_on.append(threading.current_thread().name)

    pipeline = Pipeline("cuda" if CUDA else "cpu")
    a = torch.randn(1, 2, 1, 4)
    for returns in (None, ((a.shape, torch.float32),)):
        job = pipeline.run_on_host(pipeline.fence_here(), lambda _: (a,), Input(), returns=returns)
        job.future.result()  # done: the worker let go of its inputs before that
        pipeline.host_result(job)
        pipeline.synchronize()
        del job
        pipeline.check_host_jobs()  # drops jobs that posted to a mailbox
    assert freed_on == [threading.main_thread().name] * 2
    pipeline.close()


def test_the_host_thread_frees_a_jobs_inputs_even_when_it_drops_the_job_before_the_worker_is_done():
    """The executor lets go of a job's function only after its future is done: a host thread that
    drops the job in between must still be the one that frees the job's inputs."""
    freed_on = []

    class Input:
        def __del__(self):
            freed_on.append(threading.current_thread().name)

    pipeline = Pipeline("cpu")  # the worker's side is the same on every device
    go, dropped = threading.Event(), threading.Event()
    job = pipeline.run_on_host(pipeline.fence_here(), lambda _: go.wait(timeout=30), Input())
    # Runs on the worker once the future is done, before the executor lets go of the function.
    job.future.add_done_callback(lambda _: dropped.wait(timeout=30))
    go.set()
    while not job.future.done():
        time.sleep(1e-3)
    del job
    dropped.set()
    pipeline.close()
    assert freed_on == [threading.main_thread().name]


def test_a_job_queued_while_timing_never_frees_the_work_clock(monkeypatch):
    """The clock holds its copies' timed events. A job queued while timing held it too and, still
    running when timing stopped, was the last to let go: the worker freed the events, and on the
    GPU machine stalled there until the GPU gave up waiting for the next job."""
    from hetero import pipeline as pl

    freed_on = []
    monkeypatch.setattr(pl._WorkClock, "__del__", lambda self: freed_on.append(threading.current_thread().name),
                        raising=False)
    pipeline = Pipeline("cpu")
    pipeline.time_work(True)
    go = threading.Event()
    job = pipeline.run_on_host(pipeline.fence_here(), lambda: go.wait(timeout=30), work_bytes=8)
    pipeline.time_work(False)  # while the job runs
    go.set()
    job.future.result()
    del job
    pipeline.close()
    assert freed_on == [threading.main_thread().name]


@pytest.mark.gpu
def test_a_copy_from_pageable_memory_is_refused():
    out = torch.zeros(4, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="must be pinned host memory"):
        copy_when_raised(_int32(1), 1, _int32(0), torch.zeros(4, dtype=torch.int32), out)


def test_a_wait_that_gave_up_is_reported_with_what_the_mailboxes_hold():
    pipeline = Pipeline("cpu")
    pipeline._gave_up = torch.tensor([5], dtype=torch.int32)  # as the GPU leaves it: 1 + the flag it read
    with pytest.raises(RuntimeError, match="gave up.*flag raised to / jobs posted: none; the wait that gave up last read 4"):
        pipeline.check_host_jobs()


def test_a_pipeline_with_a_host_worker_sets_the_switch_interval_and_puts_it_back(monkeypatch):
    import sys

    from hetero import pipeline as pipeline_module

    found = sys.getswitchinterval()
    monkeypatch.setattr(pipeline_module, "HOST_JOB_SWITCH_INTERVAL_S", None)
    pipeline = Pipeline("cpu")
    pipeline.host_result(pipeline.run_on_host(pipeline.fence_here(), lambda: (torch.ones(1),)))
    assert sys.getswitchinterval() == found, "None leaves the interpreter's interval alone"
    monkeypatch.setattr(pipeline_module, "HOST_JOB_SWITCH_INTERVAL_S", 2e-4)
    seen = pipeline.host_result(pipeline.run_on_host(pipeline.fence_here(), lambda: (torch.tensor([sys.getswitchinterval()]),)))
    assert float(seen[0][0]) == pytest.approx(2e-4), "the job runs with the knob's interval"
    monkeypatch.setattr(pipeline_module, "HOST_JOB_SWITCH_INTERVAL_S", 5e-5)  # changed between jobs: followed
    pipeline.host_result(pipeline.run_on_host(pipeline.fence_here(), lambda: (torch.ones(1),)))
    assert sys.getswitchinterval() == pytest.approx(5e-5)
    monkeypatch.setattr(pipeline_module, "HOST_JOB_SWITCH_INTERVAL_S", None)  # back to None: the interpreter's own
    pipeline.host_result(pipeline.run_on_host(pipeline.fence_here(), lambda: (torch.ones(1),)))
    assert sys.getswitchinterval() == found
    monkeypatch.setattr(pipeline_module, "HOST_JOB_SWITCH_INTERVAL_S", 2e-4)
    pipeline.host_result(pipeline.run_on_host(pipeline.fence_here(), lambda: (torch.ones(1),)))
    pipeline.close()
    assert sys.getswitchinterval() == found, "the interval found comes back at close"


def test_the_wait_without_the_gil_sees_a_counter_another_python_thread_raises():
    import numpy as np

    from hetero.host_wait import wait_at_least

    counter = np.zeros(1, np.int64)
    assert not wait_at_least(counter, 1, 1000)  # never raised: gives up after its polls
    raiser = threading.Thread(target=lambda: (time.sleep(0.02), counter.__setitem__(0, 7)))  # Python: needs the GIL
    raiser.start()
    assert wait_at_least(counter, 7, 10**10), "a held GIL, or a read hoisted out of the loop, would never see it"
    raiser.join()
    assert wait_at_least(counter, 3, 1)  # already past
    with pytest.raises(Exception, match="int64"):
        wait_at_least(np.zeros(1, np.int32), 1, 1)


@pytest.mark.parametrize("spins", [0, 100, 10**9])
def test_a_numbered_fence_waits_for_its_number_whichever_way_it_polls(monkeypatch, spins):
    import numpy as np

    from hetero import pipeline as pipeline_module
    from hetero.pipeline import Fence

    monkeypatch.setattr(pipeline_module, "HOST_WAIT_SPINS", spins)
    landed = np.zeros(1, np.int64)
    raiser = threading.Thread(target=lambda: (time.sleep(0.02), landed.__setitem__(0, 4)))
    raiser.start()
    Fence(None, landed, 4).synchronize()  # 100 polls run out long before: the sleeping polls take over
    assert int(landed[0]) == 4
    raiser.join()
