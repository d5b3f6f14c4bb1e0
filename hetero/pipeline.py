"""When bytes move: the only code that creates CUDA streams and events.

Two side streams: `copy` brings host blocks to the GPU ahead of the layer that needs them, through a
ring of fetch buffers; `offload` writes completed blocks from the GPU to their host home. The
compute stream is whatever stream the model runs on. A host job told the shapes of the tensors it
returns posts them to pinned memory and raises a flag there; the compute stream waits for the flag
on the GPU and reads them over PCIe itself (a copy engine would take them only after the fetch it is
busy with), so the host thread queues the layers after it instead of blocking. On a CPU device every
operation runs at once, in order, so the same callers work unchanged and are testable without a GPU.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .gpu_kernels.host_flag import copy_when_raised


# CPython hands the GIL from a thread running Python to one waiting for it when the first blocks or
# after the switch interval (5 ms by default). The host worker needs it around each CPU kernel (which
# releases it): to start the job, to take the result and to post it, while the host thread runs the
# model's Python. In an emulation (bench/gil_handoff.py, 2-core dev machine,
# bench/results/split/gil_handoff_dev_*.json) a ~0.6-0.8 ms job that met the other thread's bursts of
# Python took 11.9 ms at 5 ms and 1.8-2.5 ms at 0.05-0.2 ms with 20 ms bursts (which took 18-25%
# longer), 5.9 against 1.3-2.1 ms with 3 ms bursts (14-26% longer); with 0.4 ms bursts the interval
# did not matter. In split at 128K on the GPU machine, steps alternating within one run
# (bench/split_ab.py), 0.1 ms against 5 ms took the CPU parts from 74.0 +- 1.5 to 77.3 +- 1.2 GB/s on
# one host, where the fetches set the steps' pace, and changed neither them nor the steps beyond the
# noise on three others (bench/results/split/ab_*_2026-12-02c.json). A number is set while a pipeline
# has a host worker (read at each job, so that split_ab can change it between steps), and the
# interval found is put back at `close`; None keeps the interpreter's own.
HOST_JOB_SWITCH_INTERVAL_S: float | None = 1e-4
# How a host thread waits for a numbered fence (a layer's query landing): 0 polls the counter in
# Python (holding the GIL) a thousand times, then sleeps 20 us between polls; a number first polls
# it that many times without the GIL (hetero.host_wait, ~27 ns a poll on the dev machine), which
# sees the landing within a poll and leaves the GIL to the host thread. Off: in split at 128K
# (bench/split_ab.py, bench/results/split/ab_gil_knobs_hostD_2026-12-02c.json) 40,000 spins ran 128.9 ms
# steps and CPU parts at 75.0 GB/s against 129.0 and 74.0 without, within the noise.
HOST_WAIT_SPINS = 0


@dataclass
class TransferCounters:
    """Bytes moved by the pipeline, by direction."""

    to_gpu: int = 0
    to_host: int = 0


@dataclass
class WorkTimes:
    """Bytes each side of the `split` mode worked through and the seconds it spent on them: the copy
    engine on the ring's host-to-GPU fetches, the host worker on its attention jobs. `host_gap_seconds`:
    how long the worker went without a job between two jobs of the window, from one job's end to the
    next one's queueing: the host thread's own work between layers (it queues a layer's job only after
    taking the last one's result), which the CPU side spends every step whatever its share.
    `host_idle_seconds`: how long it went without working between two jobs of the window, from one
    job's end to the next one's start: the gap, and the wait for the next query to land. With GPU-side
    waits the host thread queues jobs ahead (no gap), and all of it is that wait: the GPU's work from
    one layer's result to the next layer's query, and, where the fetches set the pace, the fetches.
    Reported, not balanced by the share (which would then chase the fetches' own delays)."""

    copy_bytes: int = 0
    copy_seconds: float = 0.0
    host_bytes: int = 0
    host_seconds: float = 0.0
    host_gap_seconds: float = 0.0
    host_idle_seconds: float = 0.0


class _HostJobTimes:
    """The host jobs' durations while `Pipeline.time_work` is on. It holds no CUDA object: each job
    holds it until done, so the worker may be the one to free it (see HostJob)."""

    def __init__(self):
        self.jobs: list[tuple[int, float, float, float]] = []  # (bytes, seconds, gap, idle before) of finished jobs
        self.last_end: float | None = None  # when the window's last host job ended
        self.lock = threading.Lock()

    def add(self, nbytes: int, queued: float, started: float, ended: float) -> None:
        with self.lock:
            gap = 0.0 if self.last_end is None else max(0.0, queued - self.last_end)
            idle = 0.0 if self.last_end is None else max(0.0, started - self.last_end)
            self.jobs.append((nbytes, ended - started, gap, idle))
            self.last_end = ended

    def take(self, times: WorkTimes) -> None:
        with self.lock:
            jobs, self.jobs = self.jobs, []
            self.last_end = None  # a window's first job has no gap: the step boundary lies before it
        times.host_bytes = sum(job[0] for job in jobs)
        times.host_seconds = sum(job[1] for job in jobs)
        times.host_gap_seconds = sum(job[2] for job in jobs)
        times.host_idle_seconds = sum(job[3] for job in jobs)


class _WorkClock:
    """Collects copy and host-job durations while `Pipeline.time_work` is on."""

    def __init__(self):
        self.copies: deque = deque()  # (start event or None, end event or seconds, bytes), in copy order
        self.host = _HostJobTimes()

    def take(self) -> WorkTimes:
        times = WorkTimes()
        while self.copies:
            start, end, nbytes = self.copies[0]
            if start is not None and not end.query():
                break  # copies land in order: the rest are still in flight, left for the next call
            self.copies.popleft()
            times.copy_bytes += nbytes
            times.copy_seconds += end if start is None else start.elapsed_time(end) / 1e3
        self.host.take(times)
        return times


class Fence:
    """Marks the end of an asynchronous transfer; `Pipeline.wait` orders compute after it.

    A fence from `to_host(..., numbered=True)` also carries a number the stream writes into pinned
    memory (`landed`) once the copies before it are done: a host thread waits on it without a CUDA
    call. (A call such as an event's synchronize can queue behind another thread's call that waits
    for the GPU to idle, while the GPU waits for this thread: see `Pipeline.host_result`.)
    """

    __slots__ = ("event", "landed", "number")

    def __init__(self, event, landed: np.ndarray | None = None, number: int = 0):
        self.event = event
        self.landed = landed
        self.number = number

    def done(self) -> bool:
        if self.landed is not None:
            return int(self.landed[0]) >= self.number
        return self.event is None or self.event.query()

    def synchronize(self) -> None:
        """Block the calling thread until the transfer has landed."""
        if self.landed is not None:
            if HOST_WAIT_SPINS:
                from .host_wait import wait_at_least  # compiled at load where host jobs run (api._ready_cpu_kernels)

                if wait_at_least(self.landed, self.number, HOST_WAIT_SPINS):
                    return
            polls = 0
            while int(self.landed[0]) < self.number:
                polls += 1
                if polls > 1000:
                    time.sleep(20e-6)  # after a short spin, let other threads run
            return
        if self.event is not None:
            self.event.synchronize()


@dataclass
class FetchTicket:
    """A requested host-to-GPU copy of `blocks` consecutive blocks, in FIFO order."""

    source: torch.Tensor
    blocks: int
    buffer: int | None = None
    ready: object = None
    consumed: bool = False


@dataclass
class _Mailbox:
    """Pinned slots a host job writes its tensors into, then raises `flag` to the job's number. The
    slots are views of one pinned buffer (`words`), which the GPU copies out at once."""

    words: torch.Tensor  # pinned int32
    layout: tuple  # (first word, shape, dtype) of each slot
    flag: torch.Tensor  # pinned int32 [1]
    slots: tuple = ()  # views of `words`
    jobs: int = 0  # jobs posted here so far: the number the next one raises the flag to
    emptied: object = None  # event after the GPU's copy out of the slots

    @classmethod
    def new(cls, returns: tuple) -> "_Mailbox":
        layout, words = [], 0
        for shape, dtype in returns:
            layout.append((words, shape, dtype))
            nbytes = math.prod(shape) * dtype.itemsize
            words += -(-nbytes // 16) * 4  # each slot starts 16-byte aligned
        box = cls(torch.empty(max(words, 1), dtype=torch.int32, pin_memory=True), tuple(layout),
                  torch.zeros(1, dtype=torch.int32, pin_memory=True))
        box.slots = box.views(box.words)
        return box

    def views(self, words: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The slots as views of `words` (the mailbox's own, or a copy of them)."""
        flat = words.view(torch.uint8)
        return tuple(flat[4 * first : 4 * first + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                     for first, shape, dtype in self.layout)


@dataclass
class HostJob:
    """A queued host job; with a mailbox, its tensors come back through it (see `Pipeline.host_result`).

    `inputs` keeps the job's fences and arguments alive until the host thread drops the job, so that
    their events and pinned tensors are freed by the host thread, never by the worker: each free is
    a CUDA call (an event's destruction; the host allocator's event records), and one made while
    the host thread synchronizes the device, behind a GPU wait for this very worker, could wait
    until the GPU's wait gave up. For the same reason the job itself holds nothing else that owns
    a CUDA object: on the GPU machine, a job that held the work clock (its copies' timed events)
    was the last to let go of it once timing stopped, and the worker, freeing it, stalled until
    the GPU gave up the next job's wait.
    """

    future: Future
    mailbox: _Mailbox | None = None
    number: int = 0
    inputs: tuple = ()


@dataclass
class _Buffer:
    data: torch.Tensor
    released: object = None  # event recorded on the compute stream when the last reader finished


class Pipeline:
    """Orders transfers against compute for one cache on one device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.counters = TransferCounters()
        self._clock: _WorkClock | None = None
        self._mailboxes: dict[tuple, list[_Mailbox]] = {}
        self._posting: deque[HostJob] = deque()  # jobs posting to a mailbox, checked for errors in order
        self._gave_up: torch.Tensor | None = None  # pinned int32 the GPU sets if a wait for a mailbox timed out
        self._landed: torch.Tensor | None = None  # pinned int64: the number of the last `to_host` fence landed
        self._switch_interval_found: float | None = None  # the interpreter's, before HOST_JOB_SWITCH_INTERVAL_S
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.offload_stream = torch.cuda.Stream(self.device)

    def offload(self, src: torch.Tensor, dst: torch.Tensor) -> Fence:
        """Copy GPU `src` to host `dst` after the compute issued so far; returns its fence."""
        self.counters.to_host += src.numel() * src.element_size()
        if not self.cuda:
            dst.copy_(src)
            return Fence(None)
        self.offload_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.offload_stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.offload_stream)
        return Fence(event)

    def to_host(self, *tensors: torch.Tensor | None, numbered: bool = False) -> tuple[tuple, Fence]:
        """Copy small GPU tensors (a query, a mask) to pinned host memory after the compute so far.
        `numbered`: the fence also carries a number the stream writes to pinned memory once they
        land, so that a host thread waits for them without a CUDA call (see `Fence`)."""
        if not self.cuda:
            return tensors, Fence(None)
        hosts = []
        for t in tensors:
            if t is None:
                hosts.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self.counters.to_host += t.numel() * t.element_size()
            hosts.append(host)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return tuple(hosts), self._landed_fence(event) if numbered else Fence(event)

    _NUMBERS = 1 << 16

    def _landed_fence(self, event) -> Fence:
        """A fence whose number the current stream copies into pinned memory after the work so far,
        from a device tensor of rising numbers (a copy, no kernel), which moves up by its length
        each time it is used up."""
        if self._landed is None:
            self._numbers = torch.arange(1, self._NUMBERS + 1, dtype=torch.int64, device=self.device)
            self._landed = torch.zeros(1, dtype=torch.int64, pin_memory=True)
            self._landed_view = self._landed.numpy()
            self._fences = 0
        i = self._fences % self._NUMBERS
        if i == 0 and self._fences:
            self._numbers += self._NUMBERS  # on the stream, after every copy of the last round
        self._fences += 1
        self._landed.copy_(self._numbers[i : i + 1], non_blocking=True)
        return Fence(event, self._landed_view, self._fences)

    def gather(self, kernel, *args) -> Fence:
        """Run `kernel(*args)`, a gather that reads pinned host memory over PCIe, on the copy stream
        after the compute issued so far; returns its fence."""
        if not self.cuda:
            kernel(*args)
            return Fence(None)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.copy_stream.wait_stream(self.offload_stream)  # rows still being written home land first
        with torch.cuda.stream(self.copy_stream):
            kernel(*args)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return Fence(event)

    def after(self, fence: Fence, fn, *args) -> Future:
        """Call `fn(*args)` on a background thread once `fence` has landed (e.g. start a disk write
        of a block copied from the GPU); returns its future."""
        if not hasattr(self, "_spiller"):
            self._spiller = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hetero-spill")

        def job():
            fence.synchronize()
            return fn(*args)

        return self._spiller.submit(job)

    def fence_here(self) -> Fence:
        """A fence at the end of the compute issued so far."""
        if not self.cuda:
            return Fence(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Fence(event)

    def run_on_host(self, ready: Fence, fn, *args, work_bytes: int = 0, returns=None, posts: bool = False) -> HostJob:
        """Run `fn(*args)` on the host worker once `ready` (a fence or several) has landed; returns the
        job. `work_bytes`: the KV it reads, for `take_work_times`. `returns`: the (shape, dtype) of each
        tensor `fn` returns, when known: on CUDA they then come back through a pinned mailbox, and
        `host_result` does not block the calling thread. `posts`: `fn` takes the mailbox as
        `into=(slots, flag, number)`, writes its tensors into the slots and raises the flag to the
        number itself (a kernel can, without the GIL), instead of returning them to be copied there."""
        if not hasattr(self, "_worker"):
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hetero-host")
        self._set_switch_interval()

        fences = ready if isinstance(ready, (list, tuple)) else [ready]
        host_times = None if self._clock is None else self._clock.host  # never the clock: it holds CUDA events
        mailbox = self._take_mailbox(returns) if returns is not None and self.cuda else None
        number = 0
        if mailbox is not None:
            mailbox.jobs += 1
            number = mailbox.jobs
        queued = time.perf_counter()
        # The worker lets go of the fences and arguments before the job ends, so that the host
        # thread, through the HostJob, frees them (see HostJob): the executor drops a finished job's
        # function only after its future is done, when the host thread may have dropped the HostJob.
        inputs = [fences, args]

        def job():
            try:
                waits, call_args = inputs
                for fence in waits:
                    fence.synchronize()
                started = time.perf_counter()
                posting = posts and mailbox is not None
                result = fn(*call_args, into=(mailbox.slots, mailbox.flag, number)) if posting else fn(*call_args)
                if host_times is not None:
                    host_times.add(work_bytes, queued, started, time.perf_counter())
                if mailbox is not None and not posting:
                    for slot, t in zip(mailbox.slots, result, strict=True):
                        slot.copy_(t)
                return result
            finally:
                inputs.clear()  # this frame's own references end with it, before the future is done
                if mailbox is not None:
                    # Raised even when `fn` failed, so that the GPU never waits forever; the error
                    # surfaces from `host_result` or `check_host_jobs`. (Where `fn` posted, again:
                    # the same number, and the worker's next job starts only after this.)
                    mailbox.flag[0] = number

        future = self._worker.submit(job)
        return HostJob(future, mailbox, number, (fences, args))

    def host_result(self, job: HostJob) -> tuple[torch.Tensor, ...]:
        """The job's tensors on the device. With a mailbox, the compute stream waits for them on the
        GPU and the calling thread goes on at once; otherwise it waits for the job and copies them."""
        if job.mailbox is not None:
            return self._collect(job)
        results = job.future.result()
        if not self.cuda:
            return results
        moved = []
        for t in results:
            self.counters.to_gpu += t.numel() * t.element_size()
            moved.append(t.pin_memory().to(self.device, non_blocking=True))
        return tuple(moved)

    def check_host_jobs(self) -> None:
        """Raise the error of the first finished host job that failed while posting to a mailbox, or
        of a GPU wait for one that gave up."""
        while self._posting and self._posting[0].future.done():
            self._posting.popleft().future.result()
        if self._gave_up is not None and int(self._gave_up[0]):
            raise RuntimeError(
                "the GPU gave up waiting for a host job's result, so the attention it fed is wrong. The known cause: "
                "the host thread or the host worker blocked on the GPU meanwhile (e.g. CUDA's lazy loading of a "
                "kernel first launched while the wait was pending: set CUDA_MODULE_LOADING=EAGER before CUDA "
                "starts); cpu_part_wait \"host\" makes the host thread wait instead, with no GPU-side wait. "
                f"{self.mailbox_report()}"
            )

    def mailbox_report(self) -> str:
        """What the host's mailboxes hold now, and the flag value the GPU last read if a wait gave up:
        a wait that gave up on a flag its job has since raised was not seeing the host's write."""
        boxes = [box for group in self._mailboxes.values() for box in group]
        raised = ", ".join(f"{int(box.flag[0])}/{box.jobs}" for box in boxes)
        seen = 0 if self._gave_up is None else int(self._gave_up[0])
        last_read = f"; the wait that gave up last read {seen - 1}" if seen else ""
        return f"Mailboxes, flag raised to / jobs posted: {raised or 'none'}{last_read}."

    def _collect(self, job: HostJob) -> tuple[torch.Tensor, ...]:
        self.check_host_jobs()
        mailbox = job.mailbox
        if self._gave_up is None:
            self._gave_up = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        words = torch.empty_like(mailbox.words, device=self.device)
        copy_when_raised(mailbox.flag, job.number, self._gave_up, mailbox.words, words)
        self.counters.to_gpu += words.numel() * words.element_size()
        mailbox.emptied = torch.cuda.Event()
        mailbox.emptied.record(torch.cuda.current_stream(self.device))
        self._posting.append(job)
        return mailbox.views(words)

    def _take_mailbox(self, returns) -> _Mailbox:
        """A mailbox for tensors of these (shape, dtype): one the GPU has emptied, or a new one."""
        key = tuple((tuple(shape), dtype) for shape, dtype in returns)
        boxes = self._mailboxes.setdefault(key, [])
        for box in boxes:
            if box.emptied is not None and box.emptied.query():
                box.emptied = None  # taken: not free again until the GPU has copied this job's tensors
                return box
        box = _Mailbox.new(key)
        boxes.append(box)
        return box

    def close(self) -> None:
        try:
            for name in ("_worker", "_spiller"):
                if hasattr(self, name):
                    getattr(self, name).shutdown(wait=True)
        finally:
            if self._switch_interval_found is not None:
                sys.setswitchinterval(self._switch_interval_found)
                self._switch_interval_found = None
        self.check_host_jobs()

    def _set_switch_interval(self) -> None:
        """The interpreter's switch interval while host jobs run: HOST_JOB_SWITCH_INTERVAL_S (see there)."""
        wanted = HOST_JOB_SWITCH_INTERVAL_S
        if wanted is None:
            wanted = self._switch_interval_found  # the interpreter's own again, where this pipeline changed it
        if wanted is None or round(sys.getswitchinterval() * 1e6) == round(wanted * 1e6):  # kept in microseconds
            return
        if self._switch_interval_found is None:
            self._switch_interval_found = sys.getswitchinterval()
        sys.setswitchinterval(wanted)

    def wait(self, fence: Fence | None) -> None:
        """Make the compute stream wait for `fence`."""
        if fence is not None and fence.event is not None:
            torch.cuda.current_stream(self.device).wait_event(fence.event)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def quiesce(self) -> None:
        """Wait until no host job, kernel or transfer is under way: the memory they read may change then."""
        if hasattr(self, "_worker"):
            self._worker.submit(lambda: None).result()  # one worker, in order: every earlier job is done
        self.synchronize()
        self.check_host_jobs()

    def time_work(self, on: bool = True) -> None:
        """Start (or stop) timing the fetch ring's copies and the host jobs, for `take_work_times`."""
        self._clock = _WorkClock() if on else None

    def take_work_times(self) -> WorkTimes:
        """The copies that have landed and the host jobs that have finished since the last call (not
        blocking: copies still in flight count in a later call); zeros when timing is off."""
        return WorkTimes() if self._clock is None else self._clock.take()

    def time_copy(self, dst: torch.Tensor, src: torch.Tensor, repeats: int = 2) -> float:
        """Seconds of the fastest of `repeats` copies of `src` into `dst` (after one untimed copy): a probe."""
        if not self.cuda:
            dst.copy_(src)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                dst.copy_(src)
                times.append(time.perf_counter() - started)
            return min(times)
        stream = self.copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        marks = []
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
                marks.append((start, end))
        stream.synchronize()
        return min(start.elapsed_time(end) for start, end in marks) / 1e3

    def fetch_ring(self, buffers: int, blocks_per_buffer: int, block_shape, dtype) -> "FetchRing":
        return FetchRing(self, buffers, blocks_per_buffer, block_shape, dtype)


class FetchRing:
    """A ring of GPU buffers filled from host memory in request order, as far ahead as it has room.

    `submit` queues a copy; copies start as soon as a buffer is free, so requests for the next layer
    (or the next step) are already in flight while the current layer computes. `acquire` makes the
    compute stream wait for a ticket's data; `release` hands its buffer back once the compute issued
    on it is done.
    """

    def __init__(self, pipeline: Pipeline, buffers: int, blocks_per_buffer: int, block_shape, dtype):
        if buffers < 1 or blocks_per_buffer < 1:
            raise ValueError("a fetch ring needs at least one buffer of at least one block")
        self.pipeline = pipeline
        self.blocks_per_buffer = blocks_per_buffer
        shape = (blocks_per_buffer, *block_shape)
        self._buffers = [_Buffer(torch.empty(shape, dtype=dtype, device=pipeline.device)) for _ in range(buffers)]
        self._free = deque(range(buffers))
        self._queue: deque[FetchTicket] = deque()

    @property
    def bytes(self) -> int:
        return sum(b.data.numel() * b.data.element_size() for b in self._buffers)

    @property
    def buffers(self) -> int:
        return len(self._buffers)

    def submit(self, source: torch.Tensor) -> FetchTicket:
        """Queue the copy of `source` ([n, *block_shape] host blocks, n <= blocks_per_buffer)."""
        if source.shape[0] > self.blocks_per_buffer:
            raise ValueError(f"{source.shape[0]} blocks exceed the fetch buffer of {self.blocks_per_buffer}")
        ticket = FetchTicket(source=source, blocks=source.shape[0])
        self._queue.append(ticket)
        self._pump()
        return ticket

    def acquire(self, ticket: FetchTicket) -> torch.Tensor:
        """The ticket's blocks on the GPU, ordered after their copy on the compute stream."""
        if ticket.buffer is None:
            raise RuntimeError("fetch tickets must be acquired in the order they were submitted")
        if ticket.ready is not None:
            torch.cuda.current_stream(self.pipeline.device).wait_event(ticket.ready)
        return self._buffers[ticket.buffer].data[: ticket.blocks]

    def release(self, ticket: FetchTicket) -> None:
        """Return the ticket's buffer once the compute issued so far has read it."""
        if ticket.consumed or ticket.buffer is None:
            return
        ticket.consumed = True
        buf = self._buffers[ticket.buffer]
        if self.pipeline.cuda:
            buf.released = torch.cuda.Event()
            buf.released.record(torch.cuda.current_stream(self.pipeline.device))
        self._free.append(ticket.buffer)
        self._pump()

    def cancel_pending(self) -> None:
        """Drop queued requests that have no buffer yet (e.g. when generation ends)."""
        self._queue.clear()

    def _pump(self) -> None:
        pipeline = self.pipeline
        while self._queue and self._free:
            ticket = self._queue.popleft()
            ticket.buffer = self._free.popleft()
            buf = self._buffers[ticket.buffer]
            dst = buf.data[: ticket.blocks]
            nbytes = ticket.source.numel() * ticket.source.element_size()
            pipeline.counters.to_gpu += nbytes
            clock = pipeline._clock
            if not pipeline.cuda:
                started = time.perf_counter()
                dst.copy_(ticket.source)
                if clock is not None:
                    clock.copies.append((None, time.perf_counter() - started, nbytes))
                continue
            stream = pipeline.copy_stream
            if buf.released is not None:
                stream.wait_event(buf.released)
            # Host blocks still being written back by the offload stream must land first.
            stream.wait_stream(pipeline.offload_stream)
            with torch.cuda.stream(stream):
                # Timed from when the stream reaches the copy (its waits are over) to when it lands.
                start = None if clock is None else torch.cuda.Event(enable_timing=True)
                if start is not None:
                    start.record(stream)
                dst.copy_(ticket.source, non_blocking=True)
                ticket.ready = torch.cuda.Event(enable_timing=start is not None)
                ticket.ready.record(stream)
            if start is not None:
                clock.copies.append((start, ticket.ready, nbytes))
