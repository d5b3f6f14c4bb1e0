"""GenerationStats: what one generate call did, filled by the runtime and printed by the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GenerationStats:
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    gpu_kv_bytes: int
    host_kv_bytes: int
    bytes_to_gpu: int
    bytes_to_host: int
    bytes_read_by_cpu: int
    ssd_kv_bytes: int = 0
    bytes_to_ssd: int = 0
    bytes_from_ssd: int = 0
    fetched_token_share: float | None = None  # speculative: tokens gathered per layer and step, as a share of the context
    split_share_start: float | None = None  # split: the GPU share of the offloaded KV the decode began with
    split_share: float | None = None  # split: the share it ended with (refined from the first steps, with "auto")
    verified_token_share: float | None = None  # speculative, verify: of that, what the layer's own query added
    fetched_token_share_by_layer: dict | None = None  # speculative: the same per layer
    reused_token_share: float | None = None  # reuse_rows: tokens attended from rows kept since the step before
    fetched_attention_share: float | None = None  # speculation_debug: the middle's attention the fetched tokens hold
    fetched_attention_share_by_layer: dict | None = None  # the same per layer
    reselected_share: float | None = None  # speculation_debug: of the tokens selected, those selected the step before
    ssd_skipped_share: float | None = None  # ssd_miss "skip": SSD blocks left out, of those in the spans selected from
    ssd_swaps: int | None = None  # speculative with an SSD tier: blocks moved between the SSD and host memory
    split_pcie_bytes_per_s: float | None = None  # split, "auto": the fetches' PCIe rate the refining steps measured
    split_cpu_bytes_per_s: float | None = None  # the same for the CPU's attention (KV read per second)
    split_cpu_gap_s: float | None = None  # the same for the CPU side's wait per step for the host thread to queue its parts
    split_cpu_idle_s: float | None = None  # the same for all its idle time per step between parts (that wait, and queries)

    @classmethod
    def from_run(cls, cache, batch, prompt_tokens, new_tokens, started, finished) -> "GenerationStats":
        decode_start = cache.decode_started_at or finished
        s = cache.stats
        return cls(
            batch=batch,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            prefill_seconds=decode_start - started,
            decode_seconds=finished - decode_start,
            gpu_kv_bytes=s.gpu_kv_bytes,
            host_kv_bytes=s.host_kv_bytes,
            bytes_to_gpu=s.bytes_to_gpu,
            bytes_to_host=s.bytes_to_host,
            bytes_read_by_cpu=s.bytes_read_by_cpu,
            ssd_kv_bytes=s.ssd_kv_bytes,
            bytes_to_ssd=s.bytes_to_ssd,
            bytes_from_ssd=s.bytes_from_ssd,
            fetched_token_share=s.fetched_token_share,
            split_share_start=s.split_share_start,
            split_share=s.split_share,
            verified_token_share=s.verified_token_share,
            fetched_token_share_by_layer=s.fetched_token_share_by_layer,
            reused_token_share=s.reused_token_share,
            fetched_attention_share=s.fetched_attention_share,
            fetched_attention_share_by_layer=s.fetched_attention_share_by_layer,
            reselected_share=s.reselected_share,
            ssd_skipped_share=s.ssd_skipped_share,
            ssd_swaps=s.ssd_swaps,
            split_pcie_bytes_per_s=s.split_pcie_bytes_per_s,
            split_cpu_bytes_per_s=s.split_cpu_bytes_per_s,
            split_cpu_gap_s=s.split_cpu_gap_s,
            split_cpu_idle_s=s.split_cpu_idle_s,
        )

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of the prefill forward; the decode steps make the rest.
        steps = max(0, self.new_tokens - 1)
        return self.batch * steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok x{self.batch} | prefill {self.prefill_tokens_per_s:,.0f} tok/s "
            f"({self.prefill_seconds:.2f} s) | decode {self.decode_tokens_per_s:,.2f} tok/s "
            f"({self.new_tokens} new) | KV: GPU {_gib(self.gpu_kv_bytes)}, host {_gib(self.host_kv_bytes)}"
            + (f", SSD {_gib(self.ssd_kv_bytes)}" if self.ssd_kv_bytes else "")
            + (f" | fetched {self.fetched_token_share:.1%} of the context per step" if self.fetched_token_share is not None else "")
            + (f" ({self.verified_token_share:.1%} by verification)" if self.verified_token_share is not None else "")
            + (f", {self.reused_token_share:.1%} more kept from the step before" if self.reused_token_share is not None else "")
            + (f" | fetched tokens hold {self.fetched_attention_share:.1%} of the middle's attention"
               if self.fetched_attention_share is not None else "")
            + (f", {self.reselected_share:.0%} of them selected the step before" if self.reselected_share is not None else "")
            + (f" | GPU share {_share_change(self.split_share_start, self.split_share)}" if self.split_share is not None else "")
            + (f" (measured: PCIe {self.split_pcie_bytes_per_s / 1e9:.1f} GB/s, CPU attention "
               f"{self.split_cpu_bytes_per_s / 1e9:.1f} GB/s, waiting {1e3 * (self.split_cpu_gap_s or 0):.0f} ms a step "
               f"between parts for the host thread, idle {1e3 * (self.split_cpu_idle_s or 0):.0f} ms in all)"
               if self.split_cpu_bytes_per_s is not None else "")
            + (f" | SSD blocks left out {self.ssd_skipped_share:.1%}" if self.ssd_skipped_share is not None else "")
            + (f" | {self.ssd_swaps} SSD blocks traded for host ones" if self.ssd_swaps else "")
        )


def _share_change(start: float, end: float) -> str:
    return f"{end:.0%}" if round(start, 2) == round(end, 2) else f"{start:.0%} -> {end:.0%}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
