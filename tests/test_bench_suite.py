"""The benchmark suite end to end on a tiny Llama on the CPU: what it writes, not how fast it runs."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from hetero import cli
from hetero.bench_cli import BENCH_DIR

sys.path.insert(0, str(BENCH_DIR))
from suite import plots, report, runner, systems  # noqa: E402
from suite.model import kv_bytes, llama_8b_config  # noqa: E402
from suite.traffic import PATHS  # noqa: E402
from suite.workloads import WORKLOADS, scaled  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
GiB = 2**30


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """beyond-ram and the sweep, tiny, written by `hetero bench` into one directory."""
    out = tmp_path_factory.mktemp("results")
    some = "transformers-default,transformers-offloaded,stream,split"
    assert cli.main(["bench", "--workload", "beyond-ram", "--tiny", "--systems", some, "--out", str(out)]) == 0
    assert cli.main(["bench", "--workload", "sweep", "--tiny", "--systems", "stream", "--out", str(out)]) == 0
    return out


def _rows(out, workload):
    return {(r["system"], r["context"]): r for r in json.loads((out / f"{workload}.json").read_text())["rows"]}


def test_a_workload_writes_each_systems_figures(results_dir):
    result = json.loads((results_dir / "beyond-ram.json").read_text())
    assert result["scale"] == "tiny" and result["ceilings"]["cpu_stream_gbs"] > 0
    assert result["command"].startswith("hetero bench --workload beyond-ram --tiny --systems")
    rows = _rows(results_dir, "beyond-ram")
    assert set(s for s, _ in rows) == {"transformers-default", "transformers-offloaded", "hetero-stream", "hetero-split"}
    for system in ("transformers-default", "hetero-stream", "hetero-split"):
        row = rows[(system, 512)]
        assert row["status"] == "ok", row.get("reason")
        assert row["decode_steps"] == 3 and row["batch"] == 2
        for key in ("prefill_s", "ttft_s", "decode_tok_s", "step_ms", "peak_host_rss_gib"):
            assert row[key] > 0, key
        assert len(row["steps_ms"]) == 3 and sum(row["steps_ms"]) == pytest.approx(3 * row["step_ms"])
        assert set(row["bytes_per_step"]) == set(PATHS)
        assert "bound" in row and "ratio_to_bound" in row  # None without a GPU's ceilings
    split = rows[("hetero-split", 512)]
    assert split["bytes_source"].startswith("measured")
    assert split["bytes_per_step"]["ssd_read"] > 0 and split["bytes_per_step"]["cpu_read"] > 0
    assert 0 < split["ssd_share_of_kv"] < 1
    assert split["agrees_with"] == "transformers-default"
    assert rows[("transformers-default", 512)]["bytes_source"].startswith("estimated")


def test_the_offloaded_cache_is_skipped_with_its_reason_on_the_cpu(results_dir):
    row = _rows(results_dir, "beyond-ram")[("transformers-offloaded", 512)]
    assert row["status"] == "skipped" and "CUDA" in row["reason"]


def test_the_offloaded_cache_is_predicted_out_of_host_memory_where_its_peak_would_not_fit(monkeypatch):
    from types import SimpleNamespace

    model = SimpleNamespace(config=llama_8b_config())
    cuda = torch.device("cuda")  # the rule reads host memory only: no GPU needed to check it
    monkeypatch.setattr(systems.psutil, "virtual_memory", lambda: SimpleNamespace(available=120 * systems.GiB))
    many = WORKLOADS["many-sequences"]  # 64 GiB of KV: well within 120 GiB, but not 6 times over
    status, reason = systems.skip_reason(systems.OFFLOADED, many, many.context, model, cuda, False, "/tmp")
    assert status == "oom-predicted" and "out of host memory" in reason and "120 GiB available" in reason
    assert systems.skip_reason(systems.OFFLOADED, many, many.context, model, cuda, True, "/tmp") is None
    small = WORKLOADS["small-card"]  # 16 GiB of KV: it ran, peaking at 99 GiB
    assert systems.skip_reason(systems.OFFLOADED, small, small.context, model, cuda, False, "/tmp") is None


def test_markdown_and_plots_cover_every_workload_in_the_directory(results_dir):
    summary = (results_dir / "summary.md").read_text()
    assert "### beyond-ram (tiny)" in summary and "### sweep (tiny)" in summary
    assert "| hetero-split | 512 x 2 | ok |" in summary
    assert "skipped: transformers' offloaded cache needs CUDA" in summary
    assert "## The bar" in summary and "beyond-ram | 1.00 | 1 | pass" in summary
    for name in ("decode_tokens_per_s.png", "sweep_step_time.png"):
        assert (results_dir / name).read_bytes().startswith(PNG), name
    assert {c for s, c in _rows(results_dir, "sweep")} == {128, 256}


def test_report_only_rebuilds_the_table_from_the_json(results_dir):
    (results_dir / "summary.md").unlink()
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_DIR / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    assert bench_run.main(["--report-only", "--out", str(results_dir)]) == 0
    assert "### sweep (tiny)" in (results_dir / "summary.md").read_text()


def test_a_failing_system_is_a_row_and_the_next_system_still_runs(monkeypatch):
    real = runner._timed_generate

    def out_of_memory_for_the_default_cache(system, *args):
        if system == systems.DEFAULT:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        return real(system, *args)

    monkeypatch.setattr(runner, "_timed_generate", out_of_memory_for_the_default_cache)
    workload = scaled(WORKLOADS["fits"], "tiny")
    result = runner.run_workload(workload, [systems.DEFAULT, "hetero-stream"], torch.device("cpu"))
    default, stream = result["rows"]
    assert default["status"] == "oom" and "out of GPU memory" in default["reason"]
    assert stream["status"] == "ok" and "agrees_with" not in stream


def test_a_later_call_keeps_the_rows_of_systems_it_did_not_run(tmp_path):
    def result(rows, date):
        return {"workload": "fits", "scale": "full", "date": date, "rows": rows}

    runner.write_result(result([{"system": "transformers-offloaded", "status": "ok"},
                                {"system": "hetero-stream", "status": "error"}], "first"), tmp_path)
    runner.write_result(result([{"system": "hetero-stream", "status": "ok"}], "second"), tmp_path)
    later = [{"system": "hetero-stream", "status": "ok"}, {"system": "hetero-split", "status": "ok"}]
    runner.write_result(result(later, "second"), tmp_path)  # the same call saves again after its next row
    rows = json.loads((tmp_path / "fits.json").read_text())["rows"]
    assert [(r["system"], r["status"]) for r in rows] == [
        ("transformers-offloaded", "ok"), ("hetero-stream", "ok"), ("hetero-split", "ok")]
    assert rows[0]["from_earlier_call"] == "first" and "from_earlier_call" not in rows[1]


def _row(system, tok_s, **extra):
    bytes_per_step = dict.fromkeys(PATHS, 0) | extra.pop("bytes", {})
    return {"system": system, "context": 131072, "batch": 1, "status": "ok", "decode_tok_s": tok_s, "ttft_s": 1.0,
            "bytes_per_step": bytes_per_step, **extra}


def test_the_bar_compares_split_and_speculative_with_the_offloaded_cache():
    small_card = {"rows": [
        _row("transformers-offloaded", 1.0),
        _row("hetero-split", 2.0, bytes={"pcie_h2d": 1, "cpu_read": 1}, ratio_to_bound=0.5),
        _row("hetero-speculative", 12.0),
    ]}
    found = {(c["check"].split(" (")[0], c["workload"]): c for c in report.checks({"small-card": small_card})}
    assert found[("split decode vs transformers offloaded", "small-card")]["result"] == "pass"
    assert found[("split decode / its", "small-card")]["result"] == "fail"
    assert found[("speculative decode vs transformers offloaded", "small-card")]["value"] == 12.0
    assert found[("split decode vs transformers offloaded", "many-sequences")]["result"] == "not measured"


def test_splits_bound_sums_pcie_and_the_cpu_as_measured_at_once_and_the_bar_keeps_the_issues_prediction():
    from suite.traffic import step_bound

    step = {"bytes": dict.fromkeys(PATHS, 0) | {"pcie_h2d": 6e9, "cpu_read": 8e9, "hbm_read": 1e9}}
    alone = {"pcie_h2d_gbs": 50.0, "cpu_stream_gbs": 90.0, "hbm_gbs": 4000.0}
    bound = step_bound(step, alone)
    assert bound["limited_by"] == "pcie+cpu" and bound["seconds"] == pytest.approx(14e9 / 140e9)
    at_once = alone | {"pcie_h2d_beside_cpu_gbs": 45.0, "cpu_stream_beside_pcie_gbs": 55.0}
    bound = step_bound(step, at_once)
    assert bound["limited_by"] == "pcie+cpu at once" and bound["seconds"] == pytest.approx(14e9 / 100e9)
    assert bound["terms_s"]["pcie+cpu"] == pytest.approx(0.1)
    row = _row("hetero-split", 8.0, bytes=step["bytes"], ratio_to_bound=0.8, ratio_to_split_prediction=0.6)
    found = {c["check"]: c for c in report.checks({"small-card": {"rows": [row]}}) if c["workload"] == "small-card"}
    assert found["split decode / its (PCIe + CPU) bound"]["value"] == 0.6


def test_the_workloads_are_the_issues():
    config = llama_8b_config()
    assert kv_bytes(config, 1, 131072) == 16 * GiB
    small = WORKLOADS["small-card"]
    assert (small.context, small.batch, small.gpu_card_bytes) == (131072, 1, 24 * 10**9)
    assert systems.offload_config("split", small, small.context, config, False, None)["gpu_kv_bytes"] == 4 * GiB
    many, beyond = WORKLOADS["many-sequences"], WORKLOADS["beyond-ram"]
    assert (many.context, many.batch, many.gpu_kv_share, many.gpu_card_bytes) == (131072, 4, None, 80 * 10**9)
    assert (beyond.context, beyond.batch, beyond.host_kv_share) == (131072, 8, 0.75)
    quick = scaled(small, "quick")
    assert (quick.context, quick.decode_steps, quick.gpu_kv_share) == (32768, 8, 0.25)
    assert systems.select_systems(["stream", "transformers-default"]) == ["transformers-default", "hetero-stream"]
    with pytest.raises(ValueError, match="unknown hetero-nope"):
        systems.select_systems(["nope"])


def test_plots_without_matplotlib_are_still_pngs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: the standard-library canvas draws
    bound = {"seconds": 0.01, "limited_by": "pcie"}
    results = {
        "fits": {"rows": [_row("transformers-default", 30.0), {"system": "hetero-split", "context": 131072,
                                                              "status": "oom"}]},
        "sweep": {"rows": [_row("hetero-stream", 10.0, context=c, step_ms=c / 1000, bound=bound) for c in (4096, 65536)]},
    }
    paths = plots.write_plots(results, tmp_path)
    assert [p.name for p in paths] == ["decode_tokens_per_s.png", "sweep_step_time.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_the_decode_profiler_records_decode_steps_only(tmp_path):
    import profile_decode

    out = tmp_path / "prof.json"
    assert profile_decode.main(["--tiny", "--context", "300", "--gpu-kv-bytes", "320KiB", "--steps", "2",
                                "--rows", "3", "--set", "verify_share=0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["profiled_steps"] == 2 and result["config"]["verify_share"] == 0
    assert result["torch_ops_per_step"] > 0 and len(result["top_host"]) == 3
    assert "fetched" in result["summary"]  # the KV left the GPU: speculation ran


def test_the_decode_profiler_can_profile_python_functions_instead(tmp_path):
    import profile_decode

    out = tmp_path / "python.json"
    assert profile_decode.main(["--tiny", "--mode", "split", "--python", "--context", "300", "--gpu-kv-bytes", "320KiB",
                                "--steps", "2", "--rows", "40", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["profiled_steps"] == 2 and result["profiled_ms_per_step"] > 0
    assert len(result["top_self"]) == 40 and len(result["top_cumulative"]) == 40
    assert any("attend" in row["name"] for row in result["top_cumulative"])  # hetero's attention was profiled


def test_the_split_timeline_records_each_steps_fetches_and_cpu_parts(tmp_path):
    import split_timeline

    from hetero import pipeline

    run_on_host = pipeline.Pipeline.run_on_host
    out = tmp_path / "timeline.json"
    from hetero import cache

    assert split_timeline.main(["--tiny", "--steps", "4", "--show", "2", "--set", "split_ratio=0.5",
                                "--knob", "hetero.cache.LOOK_PAST_STEP_END=false", "--out", str(out)]) == 0
    assert cache.LOOK_PAST_STEP_END is True, "a knob is set for the run alone"
    assert json.loads(out.read_text())["knobs"] == {"hetero.cache.LOOK_PAST_STEP_END": False}
    steps = json.loads(out.read_text())["steps"]
    assert len(steps) == 2 and all(s["jobs"] and s["copies"] and s["cpu_busy"] > 0 for s in steps)
    assert all(j["queued"] <= j["started"] <= j["ended"] for s in steps for j in s["jobs"])
    assert pipeline.Pipeline.run_on_host is run_on_host, "the pipeline is left as it was"


def test_step_times_runs_each_variant_on_one_prompt(tmp_path):
    import step_times

    out = tmp_path / "steps.json"
    # A fixed window: the prompt's middle is then fetched during prefill too.
    stream = "stream:grow_window=false"
    assert step_times.main(["--tiny", "--steps", "4", "--variants", stream, "split:cpu_part_wait=gpu,split_ratio=0.5",
                            "split:hetero.cache.NO_SUCH_KNOB=1", stream, "--hang-s", "300", "--stall-dump-s", "60",
                            "--sync-each-token", "--profile-first-gap", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert "has no attribute NO_SUCH_KNOB" in result["variants"].pop("split:hetero.cache.NO_SUCH_KNOB=1")["error"]
    assert f"{stream} (run 2)" in result["variants"], "a variant given twice keeps both rows"
    split = result["variants"]["split:cpu_part_wait=gpu,split_ratio=0.5"]
    assert split["config"]["cpu_part_wait"] == "gpu" and split["config"]["split_ratio"] == 0.5
    assert all(len(v["step_ms"]) == 2 and v["median_step_ms"] > 0 for v in result["variants"].values())
    # As the suite times them: token to token (3 steps), and each token's call to the next step's first update.
    assert all(len(v["token_step_ms"]) == 3 and len(v["token_to_update_ms"]) == 3 for v in result["variants"].values())
    assert all(0 < gap < step for v in result["variants"].values()
               for gap, step in zip(v["token_to_update_ms"], v["token_step_ms"]))
    assert all("cum" in line for v in result["variants"].values() for line in v["first_gap_functions"])
    # Decode traffic only: below the whole call's bytes over its 4 tokens, which prefill's fetches swell.
    stream = result["variants"][stream]
    assert 0 < stream["pcie_bytes_per_step"] < stream["pcie_bytes_with_prefill"] / 4


def test_isolated_systems_run_in_processes_of_their_own_and_land_in_one_call(tmp_path, monkeypatch, capsys):
    from suite import main as suite_main

    ran = []
    real_run = suite_main.subprocess.run

    def run(command, **kwargs):
        if "bench" in command:  # not platform's `uname -p`, which runs on the first machine() call
            ran.append(command)
        if "hetero-split" in command:
            return real_run([sys.executable, "-c", "raise SystemExit(3)"])  # a process that dies
        return real_run(command, **kwargs)

    monkeypatch.setattr(suite_main.subprocess, "run", run)
    suite_main.run_suite(["fits"], scale="tiny", systems=["transformers-default", "stream", "split"], out=tmp_path,
                         device="cpu", isolate=True, command="hetero bench --workload fits --tiny")
    assert len(ran) == 3 and all("--same-process" in c and "--run-date" in c for c in ran)
    result = json.loads((tmp_path / "fits.json").read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert result["command"] == "hetero bench --workload fits --tiny"
    assert rows["transformers-default"]["status"] == "ok" and "from_earlier_call" not in rows["transformers-default"]
    assert rows["hetero-stream"]["agrees_with"] == "transformers-default"
    assert rows["hetero-split"]["status"] == "error" and "exited with code 3" in rows["hetero-split"]["reason"]
    assert "### fits (tiny)" in (tmp_path / "summary.md").read_text()


def test_a_killed_system_process_is_reported_by_its_signal():
    from suite.main import exit_reason

    code = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]).returncode
    assert "killed by SIGKILL" in exit_reason(code) and "out-of-memory killer" in exit_reason(code)
    assert exit_reason(-15) == "its benchmark process was killed by SIGTERM"
    assert exit_reason(3) == "its benchmark process exited with code 3"


def test_a_system_past_its_timeout_is_stopped_and_the_overrides_reach_each_process(tmp_path, monkeypatch):
    from suite import main as suite_main

    ran = []
    real_run = suite_main.subprocess.run

    def run(command, **kwargs):
        ran.append((command, kwargs))
        if "hetero-stream" in command:  # a process that hangs: stopped at its timeout
            return real_run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
        return real_run(command, **kwargs)

    monkeypatch.setattr(suite_main.subprocess, "run", run)
    suite_main.run_suite(["fits"], scale="tiny", systems=["stream", "split"], out=tmp_path, device="cpu",
                         isolate=True, overrides={"split_ratio": 0.5, "cpu_part_wait": "gpu"}, system_timeout=300)
    assert all(kwargs["timeout"] == 300 for _, kwargs in ran)
    assert all(c[c.index("--system-timeout") + 1] == "300" for c, _ in ran)
    assert all({"split_ratio=0.5", "cpu_part_wait=gpu"} <= set(c) for c, _ in ran)
    rows = {r["system"]: r for r in json.loads((tmp_path / "fits.json").read_text())["rows"]}
    assert rows["hetero-stream"]["status"] == "timeout" and "--system-timeout" in rows["hetero-stream"]["reason"]
    assert rows["hetero-split"]["status"] == "ok"
    assert rows["hetero-split"]["offload_config"]["split_ratio"] == 0.5
    assert rows["hetero-split"]["offload_config"]["cpu_part_wait"] == "gpu"


def test_a_call_whose_only_system_timed_out_still_has_its_table(tmp_path, monkeypatch):
    from suite import main as suite_main

    real_run = suite_main.subprocess.run
    monkeypatch.setattr(suite_main.subprocess, "run", lambda command, **kwargs: real_run(
        [sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5))
    suite_main.run_suite(["fits"], scale="tiny", systems=["split"], out=tmp_path, device="cpu", isolate=True,
                         system_timeout=300)
    table = (tmp_path / "summary.md").read_text()
    assert "| hetero-split | " in table and "timeout" in table
    assert "Machine: cpu, " in table and "none measured" in table


def test_bench_set_names_a_bad_key_before_anything_runs():
    from hetero.bench_cli import parse_overrides

    assert parse_overrides(["split_ratio=0.5", "cpu_part_wait=gpu", "reuse_rows=true"]) == {
        "split_ratio": 0.5, "cpu_part_wait": "gpu", "reuse_rows": True}
    with pytest.raises(Exception, match="cpu_part_wai.*did you mean 'cpu_part_wait'"):
        parse_overrides(["cpu_part_wai=gpu"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        parse_overrides(["cpu_part_wait"])


def test_knob_values_read_none_as_python_spells_it():
    from hetero.bench_cli import parse_key_values

    assert parse_key_values(["a.B=None", "a.C=null", "a.D=1e-4", "a.E=true", "a.F=word"], "--b", "a.B=1") == {
        "a.B": None, "a.C": None, "a.D": 1e-4, "a.E": True, "a.F": "word"}


def test_a_variant_or_knob_without_a_value_is_named_in_the_error():
    import split_timeline
    import step_times

    assert step_times.parse_variant("split:split_ratio=0.5,hetero.cache.LOOK_PAST_STEP_END=false")[1] == {
        "mode": "split", "split_ratio": 0.5, "hetero.cache.LOOK_PAST_STEP_END": False}
    with pytest.raises(SystemExit, match="variant 'split:split_ratio': got 'split_ratio', expected KEY=VALUE"):
        step_times.parse_variant("split:split_ratio")
    with pytest.raises(SystemExit, match="--knob: got 'hetero.cache.LOOK_PAST_STEP_END', expected KEY=VALUE"):
        split_timeline.main(["--tiny", "--knob", "hetero.cache.LOOK_PAST_STEP_END"])


def test_the_kernel_benchmarks_name_a_bad_grid_or_sweep_shape_in_the_error():
    import bench_gpu_kernels
    import bench_split_contention

    grid = bench_split_contention.sweep_grid(["TILE_TOKENS=64,128", "BF16_TILES=None,False"])
    assert grid["TILE_TOKENS"] == (64, 128) and grid["BF16_TILES"] == (None, False)
    assert grid["PREFETCH_NEXT_TILE"] == bench_split_contention.SWEEP["PREFETCH_NEXT_TILE"]
    with pytest.raises(SystemExit, match="--grid TILE_TOKENS=abc: expected comma-separated numbers"):
        bench_split_contention.sweep_grid(["TILE_TOKENS=abc"])
    with pytest.raises(SystemExit, match="--grid FOO: not a swept knob"):
        bench_split_contention.sweep_grid(["FOO=1"])
    assert bench_gpu_kernels.batch_by_tokens("8x32768") == (8, 32768)
    with pytest.raises(Exception, match="got '8x', expected BATCHxTOKENS"):
        bench_gpu_kernels.batch_by_tokens("8x")


def test_rows_kept_from_a_call_on_another_machine_name_it(tmp_path):
    def result(system, device, date):
        return {"workload": "fits", "scale": "full", "date": date, "machine": {"device": device},
                "rows": [{"system": system, "status": "ok"}]}

    runner.write_result(result("hetero-split", "H100", "first"), tmp_path)
    runner.write_result(result("hetero-stream", "H200", "second"), tmp_path)
    runner.write_result(result("hetero-speculative", "H200", "third"), tmp_path)
    rows = {r["system"]: r for r in json.loads((tmp_path / "fits.json").read_text())["rows"]}
    assert rows["hetero-split"]["from_machine"] == "H100" and rows["hetero-split"]["from_earlier_call"] == "first"
    assert "from_machine" not in rows["hetero-stream"] and rows["hetero-stream"]["from_earlier_call"] == "second"


def test_the_table_names_rows_kept_from_an_earlier_call():
    result = {"workload": "fits", "scale": "full", "description": "d", "date": "now", "command": "c",
              "machine": {"device": "cpu", "cpu_cores": 2, "ram_gib": 24.0},
              "ceilings": {"pcie_h2d_gbs": 1.0, "sources": {"disk_read_gbs": "LIMITS.md"}},
              "rows": [{"system": s, "context": 8, "batch": 1, "status": "error", "reason": "r", **extra}
                       for s, extra in (("hetero-stream", {"from_earlier_call": "yesterday"}), ("hetero-split", {}),
                                        ("hetero-speculative", {"from_earlier_call": "monday", "from_machine": "H100"}))]}
    table = "\n".join(report.workload_table(result))
    assert "| hetero-stream (from the call of yesterday) | 8 x 1 |" in table and "| hetero-split | 8 x 1 |" in table
    assert "| hetero-speculative (from the call of monday on H100) | 8 x 1 |" in table


@pytest.mark.gpu
def test_pcie_and_the_cpu_are_measured_side_by_side():
    from suite.ceilings import pcie_and_cpu_at_once

    pcie, cpu = pcie_and_cpu_at_once(64 * 2**20, seconds=0.2, copy_bytes=2**26)
    assert 1e9 < pcie < 1e12 and 1e8 < cpu < 1e12


def test_kernel_breakdown_variants_edit_code_the_kernel_still_has():
    """Each variant of bench/cpu_kernel_breakdown.py changes text of cpu_kernels that is still there:
    a kernel reshaped since fails here, not on the GPU machine."""
    import cpu_kernel_breakdown

    root = BENCH_DIR.parent / "cpu_kernels"
    assert {"full", "no_scores", "no_values", "called_steps", "amx"} <= set(cpu_kernel_breakdown.VARIANTS)
    for name, edits in cpu_kernel_breakdown.VARIANTS.items():
        for old, _new, *where in edits:
            assert old in (root / (where[0] if where else "_kernel.py")).read_text(), (name, old)


def test_the_cpu_ceiling_reads_every_way_at_any_size():
    """The CPU kernel's ceiling takes each of its streaming reads, the prefetched one included, at a
    size that is not a whole number of its 64-byte lines."""
    from bench_cpu_attention import streaming_ceiling

    ceiling = streaming_ceiling(0.003, 1, 1)
    assert set(ceiling) == {"uint16", "float32", "float32_prefetched", "float64_probe"}
    assert all(0 < gbps < 1e4 for gbps in ceiling.values())


def test_probe_repeat_records_each_probe_and_the_one_after_a_pause(tmp_path):
    import probe_repeat
    from hetero import cpu_kernels

    out = tmp_path / "probe.json"
    try:
        assert probe_repeat.main(["--repeats", "2", "--pause-s", "0", "--scan-mib", "1", "--out", str(out)]) == 0
    finally:
        cpu_kernels.set_threads(None)  # as split sets them at load: every later test's default again
    record = json.loads(out.read_text())
    assert len(record["back_to_back_gbs"]) == 2 and all(g > 0 for g in record["back_to_back_gbs"])
    assert record["after_pause_gbs"] > 0 and record["scan_bytes"] == 1 << 20


def test_host_noise_samples_reads_and_the_stolen_time_by_second(tmp_path):
    import host_noise
    from proc_stat import mean_by_cpu, most_stolen, steal_share, steal_share_by_cpu

    assert steal_share((5, 100), (8, 160)) == pytest.approx(0.05)
    assert steal_share(None, (8, 160)) is None and steal_share((5, 100), (5, 100)) is None
    assert steal_share_by_cpu([(0, 10), (5, 100)], [(1, 20), (5, 100)]) == [pytest.approx(0.1), None]
    assert steal_share_by_cpu(None, [(1, 20)]) is None
    assert mean_by_cpu([[0.1, None], None, [0.3, 0.2]]) == [pytest.approx(0.2), pytest.approx(0.2)]
    assert mean_by_cpu([None]) is None
    assert most_stolen([0.001, 0.12, None], n=2) == "cpu1 12.0%, cpu0 0.1%" and most_stolen(None) == "-"
    out = tmp_path / "noise.json"
    assert host_noise.main(["--seconds", "1.2", "--gib", "0.0625", "--window-mib", "4", "--threads", "1",
                            "--gap-ms", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["summary"]["reads"] == len(record["reads"]) > 1 and all(r["gbs"] > 0 for r in record["reads"])
    assert record["window_bytes"] == 4 << 20 and len(record["steal_by_second"]) >= 1
    assert all("by_cpu" in second for second in record["steal_by_second"])  # None off Linux
    starts = [r["t_s"] for r in record["reads"]]
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 1e-3, "the reads come at least the gap apart"


def test_gil_handoff_times_jobs_at_each_interval_and_puts_the_interval_back(tmp_path):
    import sys

    import gil_handoff
    from hetero import cpu_kernels

    out, found = tmp_path / "gil.json", sys.getswitchinterval()
    try:
        assert gil_handoff.main(["--intervals-ms", "5", "0.1", "--burst-ms", "2", "--sleep-ms", "1", "--jobs", "12",
                                 "--blocks", "1", "--out", str(out)]) == 0
    finally:
        cpu_kernels.set_threads(None)
    record = json.loads(out.read_text())
    assert set(record["intervals"]) == {"5.0", "0.1"} and record["alone_ms"] > 0
    assert all(row["burst_ms"] > 0 for row in record["intervals"].values())
    assert sys.getswitchinterval() == found


def test_split_ab_takes_turns_between_settings_and_puts_the_knobs_back(tmp_path, capsys):
    import split_ab
    from hetero.cpu_kernels import attention
    from proc_stat import jiffies_by_cpu

    out = tmp_path / "ab.json"
    knob, default = "hetero.cpu_kernels.attention.UNITS_PER_THREAD", attention.UNITS_PER_THREAD
    assert split_ab.main(["--tiny", "--steps", "8", "--settle", "2", "--b", f"{knob}=4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["settings"] == {"A": {knob: default}, "B": {knob: 4}}
    steps = {name: [row["step"] for row in rows] for name, rows in record["steps"].items()}
    assert steps["A"] == [2, 4, 6] and steps["B"] == [3, 5], "each step the next setting, from the settled one on"
    assert all(row["cpu_bytes"] > 0 and row["cpu_s"] > 0 for rows in record["steps"].values() for row in rows)
    assert record["summary"]["B"]["steps"] == 2 and record["summary"]["B"]["cpu_gbs"] > 0
    assert all("steal" in row for rows in record["steps"].values() for row in rows)  # None off Linux
    by_cpu = record["summary"]["A"]["mean_steal_by_cpu"]
    assert by_cpu is None or len(by_cpu) == len(jiffies_by_cpu() or [])
    assert attention.UNITS_PER_THREAD == default  # put back
    with pytest.raises(SystemExit):
        split_ab.main(["--tiny", "--b", "hetero.cpu_kernels.attention.NO_SUCH_KNOB=1"])
    with pytest.raises(SystemExit):
        split_ab.main(["--tiny"])  # nothing to set beside the defaults
    assert "give --b KNOB=VALUE,..., --avoid-stolen K, --shares-around D or --follow N" in capsys.readouterr().err
    for bad, message in ((["--follow", "-1"], "--follow: got -1, expected a number of windows"),
                         (["--shares-around", "1"], "--shares-around: got 1.0, expected a share step in [0, 1)")):
        with pytest.raises(SystemExit):
            split_ab.main(["--tiny", *bad])
        assert message in capsys.readouterr().err


def test_split_ab_shares_around_runs_the_held_share_moved_each_way(tmp_path):
    import split_ab

    out = tmp_path / "ab.json"
    assert split_ab.main(["--tiny", "--steps", "9", "--settle", "2", "--shares-around", "0.1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    held = {row["share"] for row in record["steps"]["A"]}
    assert len(held) == 1, "A runs the held share"
    (held,) = held
    for name, delta in (("B", -0.1), ("C", 0.1)):
        rows = record["steps"][name]
        assert rows and all(row["share"] == pytest.approx(min(1.0, max(0.0, held + delta))) for row in rows)
        assert record["summary"][name]["share"] == pytest.approx(rows[0]["share"])


def test_split_ab_follow_runs_the_share_its_follower_balances_the_last_windows_at(tmp_path, monkeypatch):
    import split_ab

    seen = []
    observe = split_ab.SplitTuner.observe

    def noted(tuner, times):
        seen.append(times)
        return observe(tuner, times)

    monkeypatch.setattr(split_ab.SplitTuner, "observe", noted)
    out = tmp_path / "ab.json"
    assert split_ab.main(["--tiny", "--steps", "9", "--settle", "2", "--follow", "3", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["steps"]["B"] and all("share" in row["chosen"] for row in record["steps"]["B"])
    assert len({row["share"] for row in record["steps"]["A"]}) == 1, "A holds the share"
    assert len(seen) >= len(record["steps"]["A"]) + len(record["steps"]["B"]), "the follower sees every step"


def test_split_ab_avoid_stolen_keeps_the_threads_off_the_most_stolen_cpus_and_puts_them_back(tmp_path):
    import split_ab
    from hetero.cpu_kernels import attention
    from hetero.cpu_kernels.thread_cpus import pin_team, team_thread_ids

    if team_thread_ids() is None:
        pytest.skip("no gettid here")
    out, threads = tmp_path / "ab.json", attention._threads
    try:  # a floor of -1: even a vCPU stolen from not at all may be avoided, the most stolen first
        assert split_ab.main(["--tiny", "--steps", "7", "--settle", "2", "--avoid-stolen", "1", "--stolen-floor", "-1",
                              "--out", str(out)]) == 0
    finally:
        pin_team(None)
    record = json.loads(out.read_text())
    turns = record["steps"]["B"]
    assert turns and all(len(row["chosen"]["off"]) <= 1 for row in turns)
    assert any(row["chosen"]["off"] for row in turns), "a vCPU avoided once steal readings exist"
    assert "chosen" not in record["steps"]["A"][0]
    assert attention.THREAD_CPUS is None and attention._threads == threads  # put back


def test_tuner_windows_logs_every_window_with_the_share_it_ran_at_and_puts_the_tuner_back(tmp_path):
    import tuner_windows
    from hetero.split_tuner import SplitTuner

    observe = SplitTuner.observe
    out = tmp_path / "windows.json"
    assert tuner_windows.main(["--tiny", "--steps", "4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    windows = record["windows"]
    assert [w["window"] for w in windows] == list(range(len(windows))) and len(windows) >= 2
    assert windows[0]["share_ran"] == record["start_share"]
    assert all(a["share_next"] == b["share_ran"] for a, b in zip(windows, windows[1:]))
    assert all(w["copies_busy_ms"] >= 0 and w["cpu_busy_ms"] >= 0 for w in windows)
    assert SplitTuner.observe is observe


def test_kernel_rounds_sets_each_variant_beside_the_default_kernel_of_its_round(tmp_path, capsys):
    import kernel_rounds
    from hetero.cpu_kernels import attention

    out = tmp_path / "rounds.json"
    defaults = attention.UNITS_PER_THREAD, attention.TILE_TOKENS
    assert kernel_rounds.main(["--tokens", "512", "--batches", "1", "--rounds", "1", "--reps", "1", "--sdpa-reps", "1",
                               "--ceiling-gib", "0.003", "--threads", "1", "--small-pages",
                               "--knobs", "UNITS_PER_THREAD=3,TILE_TOKENS=64", "--out", str(out)]) == 0
    batch = json.loads(out.read_text())["batches"]["1"]
    assert set(batch["variants_against_default"]) == {"kernel, 4 KiB pages", "reads, 4 KiB pages",
                                                      "UNITS_PER_THREAD=3,TILE_TOKENS=64"}
    assert all(r > 0 for r in batch["variants_against_default"].values())
    assert batch["small_pages_huge_page_share"] is None or 0 <= batch["small_pages_huge_page_share"] <= 1
    assert (attention.UNITS_PER_THREAD, attention.TILE_TOKENS) == defaults  # the knobs were put back
    with pytest.raises(SystemExit):
        kernel_rounds.main(["--knobs", "NO_SUCH_KNOB=1"])
    assert "cpu_kernels.attention has no knob NO_SUCH_KNOB" in capsys.readouterr().err
