"""Timing and memory of one generate call: token times, peak GPU and host memory, progress lines."""

from __future__ import annotations

import gc
import threading
import time

import psutil
import torch
from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """The time of each put(); generate's first put() is the prompt, the second the first new token.

    `on_first_token` runs at the first new token: the moment prefill ends and decode begins."""

    def __init__(self, on_token=None, on_first_token=None, device: torch.device | None = None):
        self.times: list[float] = []
        self._device = device
        self._on_token = on_token
        self._on_first_token = on_first_token

    def put(self, value):
        if self._device is not None:
            synchronize(self._device)  # the token is computed, not merely queued
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self._on_first_token is not None:
            self._on_first_token()
        if len(self.times) >= 2 and self._on_token is not None:
            self._on_token(len(self.times) - 1)

    def end(self):
        pass


class Progress:
    """Prefill and decode progress as plain lines, at most one every `every_s` seconds.

    Prefill is counted by a forward pre-hook on the model (each prompt chunk is one forward)."""

    def __init__(self, label: str, prompt_tokens: int, new_tokens: int, every_s: float = 10.0):
        self.label, self.prompt_tokens, self.new_tokens, self.every_s = label, prompt_tokens, new_tokens, every_s
        self.start = time.perf_counter()
        self.seen = 0
        self._last = self.start

    def _say(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last >= self.every_s:
            self._last = now
            print(f"    {self.label}: {text} ({now - self.start:.0f} s)", flush=True)

    def forward_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and self.seen < self.prompt_tokens:
            self.seen += ids.shape[1]
            self._say(f"prefill {min(self.seen, self.prompt_tokens)}/{self.prompt_tokens} tokens",
                      force=self.seen >= self.prompt_tokens)

    def token(self, n: int) -> None:
        self._say(f"decode {n}/{self.new_tokens} tokens", force=n == self.new_tokens)


class HostMemoryPeak:
    """Peak resident set size of this process, sampled by a thread while a block runs."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "HostMemoryPeak":
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def free_memory(device: torch.device) -> None:
    """Return what the last system held, so the next one starts from the weights alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gpu_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None
