"""Host jobs whose tensors come back to the GPU: the result, the errors, and on CUDA a host thread that
goes on while the compute stream waits on the GPU for the job's flag."""

import threading

import pytest
import torch

from hetero.gpu_kernels.host_flag import wait_for_flag
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
    assert int(gave_up[0]) == 1


def test_a_flag_that_is_no_single_int32_is_refused():
    with pytest.raises(ValueError, match="flag must be one int32"):
        wait_for_flag(torch.zeros(2, dtype=torch.int32), 1, _int32(0))
    with pytest.raises(ValueError, match="gave_up must be one int32"):
        wait_for_flag(_int32(1), 1, torch.zeros(1, dtype=torch.int64))


def test_a_job_with_known_returns_gives_its_tensors_and_its_errors():
    pipeline = Pipeline("cuda" if CUDA else "cpu")
    a, b = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1)
    returns = ((a.shape, torch.float32), (b.shape, torch.float32))
    for _ in range(3):  # a mailbox is reused once the GPU has emptied it
        job = pipeline.run_on_host(pipeline.fence_here(), lambda: (a, b), returns=returns)
        out_a, out_b = pipeline.host_result(job)
        torch.testing.assert_close(out_a.cpu(), a, rtol=0, atol=0)
        torch.testing.assert_close(out_b.cpu(), b, rtol=0, atol=0)

    def broken():
        raise ArithmeticError("the CPU part failed")

    job = pipeline.run_on_host(pipeline.fence_here(), broken, returns=returns)
    with pytest.raises(ArithmeticError, match="CPU part failed"):
        pipeline.host_result(job)
        pipeline.synchronize()  # on CUDA the GPU goes past the raised flag; the error shows next
        pipeline.check_host_jobs()
    pipeline.close()


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
def test_a_host_thread_waits_for_copies_to_the_host_without_a_cuda_call(monkeypatch):
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
        job.future.result()  # done: the worker has let go of the job
        pipeline.host_result(job)
        pipeline.synchronize()
        del job
        pipeline.check_host_jobs()  # drops jobs that posted to a mailbox
    assert freed_on == [threading.main_thread().name] * 2
    pipeline.close()
