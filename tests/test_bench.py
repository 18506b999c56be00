"""``python -m torch_matgrad bench`` and ``benchmarks/gpu_check.sh`` on the CPU, tiny shapes."""

from __future__ import annotations

import argparse
import csv
import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from torch_matgrad.bench import cli, environment, measure, plans, providers, report
from torch_matgrad.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _args(*argv):
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(argv)


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_quick_plans():
    # On a CPU fp32 only (bf16 runs ~45x slower without bf16 arithmetic): done in minutes.
    cpu = plans.plan(_args("--quick"), "cpu")
    assert {(c.m, c.k, c.n) for c in cpu} == set(plans.SHAPE_SETS["cpu_quick"])
    assert {c.dtype for c in cpu} == {"fp32"} and {c.mode for c in cpu} == {"full"}
    assert len(cpu) == len(plans.SHAPE_SETS["cpu_quick"]) * len(plans.DEFAULT_ACTIVATIONS)
    assert {c.dtype for c in plans.plan(_args("--quick", "--dtype", "bf16"), "cpu")} == {"bf16"}
    assert {c.dtype for c in plans.plan(_args(), "cpu")} == {"fp32"}
    cuda = plans.plan(_args("--quick"), "cuda")
    assert {c.dtype for c in cuda} == {"bf16"}
    assert {(c.activation, c.mode) for c in cuda} == {
        ("none", "forward"), ("none", "backward"), ("gelu_tanh", "full"), ("silu", "full")}
    assert (4096, 4096, 4096) in {(c.m, c.k, c.n) for c in cuda}
    # Explicit options override the quick defaults.
    only = plans.plan(_args("--quick", "--mode", "forward", "--activation", "silu", "--shapes", "tiny"), "cuda")
    assert {(c.activation, c.mode, c.shape_set) for c in only} == {("silu", "forward", "tiny")}


def test_full_plan_covers_the_issue_shapes():
    cases = plans.plan(_args("--shapes", "all", "--dtype", "bf16", "--activation", "none", "--mode", "full"), "cuda")
    shapes = {(c.m, c.k, c.n) for c in cases}
    for m in (512, 2048, 8192, 16384):
        for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)):
            assert (m, k, n) in shapes
    assert {(s, s, s) for s in (1024, 8192)} <= shapes
    assert {1, 64} <= {c.m for c in cases} and 4095 in {c.k for c in cases}
    assert len(cases) == len(shapes)  # no case twice


def test_bad_option_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "fp8"])
    assert "choose from bf16, fp16, fp32" in capsys.readouterr().err


def test_ctrl_c_stops_at_once_and_reports_the_finished_cases(tmp_path):
    # bf16 steps on a CPU sit in one C++ GEMM for long stretches, where Python cannot take
    # the signal: the run must still stop within a second or two and write what finished.
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch_matgrad", "bench", "--device", "cpu", "--shapes", "tiny,cpu",
           "--dtype", "fp32,bf16", "--activation", "none", "--mode", "full", "--rep-ms", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lines = []  # (time, line) of stderr as it comes

    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in run.stderr))
        reader.start()
        deadline = time.monotonic() + 120
        while len((out / "bench.csv").read_text().splitlines() if (out / "bench.csv").exists() else []) < 3:
            assert run.poll() is None and time.monotonic() < deadline, "no case finished"
            time.sleep(0.05)
        run.send_signal(subprocess.signal.SIGINT)
        sent = time.monotonic()
        stdout = run.stdout.read()
        run.wait(timeout=120)
        reader.join()
    stderr = "".join(line for _, line in lines)
    # It stops at once (writing the table and plot of what finished may take longer).
    stopped = [t for t, line in lines if "bench: interrupted" in line]
    assert stopped and stopped[0] - sent < 2, stderr
    assert run.returncode == 130 and "Traceback" not in stderr, stderr
    _, rows = _read_csv(out / "bench.csv")
    finished = {(r["M"], r["K"], r["N"], r["dtype"]) for r in rows}
    assert 1 <= len(finished) < 2 * (len(plans.SHAPE_SETS["tiny"]) + len(plans.SHAPE_SETS["cpu"]))
    table = (out / "bench.md").read_text()
    assert all(f"{m} x {k} x {n}" in table for m, k, n, _ in finished) and "eager" in stdout
    assert list(out.glob("tflops_*.png"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CPU run over every mode, activation and two dtypes on tiny shapes."""
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--device", "cpu", "--shapes", "tiny", "--dtype", "fp32,bf16", "--out", str(out),
               "--rep-ms", "5"])
    return rc, out


def test_cli_writes_csv_markdown_and_plot(tiny_run, capsys):
    rc, out = tiny_run
    assert rc == 0
    columns, rows = _read_csv(out / "bench.csv")
    assert tuple(columns) == report.CSV_COLUMNS
    cases = len(plans.SHAPE_SETS["tiny"]) * 2 * len(plans.DEFAULT_ACTIVATIONS) * len(plans.MODES)
    assert len(rows) == 2 * cases
    for r in rows:
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["commit"] and r["date"]
        assert r["clock"] == "wall time" and f"{os.cpu_count()} cores" in r["device_name"]
        assert r["provider"] in ("torch_matgrad", "eager")
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        flops = {"forward": 2, "backward": 4, "full": 6}[r["mode"]] * int(r["M"]) * int(r["K"]) * int(r["N"])
        assert float(r["tflops"]) == pytest.approx(flops / float(r["median_ms"]) / 1e9, rel=1e-2)
        assert r["peak_mem_mib"] == ""  # CPU: no peak counter (documented)
        assert float(r["max_rel_diff_vs_eager"]) <= measure.MATCH_TOL[plans.DTYPES[r["dtype"]]] and not r["error"]
    eager = [r for r in rows if r["provider"] == "eager"]
    assert all(r["time_vs_eager"] == "1.000" and r["backend"] == "eager" for r in eager)
    assert {r["backend"] for r in rows if r["provider"] == "torch_matgrad"} == {"auto->torch"}
    md = (out / "bench.md").read_text()
    assert "| set | M x K x N | dtype | act | mode | torch_matgrad ms" in md
    assert md.count("| tiny |") == cases and "geomean time / eager" in md
    png = out / "tflops_tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_mismatch_makes_the_command_fail(tmp_path, monkeypatch, capsys):
    # A provider computing the wrong function (bias dropped) must be caught before timing.
    monkeypatch.setattr(providers, "matgrad", lambda x, w, b, act: providers.eager(x, w, None, act))
    rc = main(["bench", "--device", "cpu", "--shapes", "tiny", "--dtype", "fp32", "--activation", "silu",
               "--mode", "forward", "--out", str(tmp_path), "--rep-ms", "1", "--no-plot"])
    assert rc == 1
    assert "MISMATCH: torch_matgrad (auto->torch) at 7x33x17 fp32 silu forward differs" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_a_failing_provider_is_reported_and_the_rest_timed(tmp_path, monkeypatch, capsys):
    def broken(x, w, b, act):
        raise RuntimeError("kernel launch failed\nsecond line")

    monkeypatch.setattr(providers, "matgrad", broken)
    rc = main(["bench", "--device", "cpu", "--shapes", "tiny", "--dtype", "bf16", "--activation", "none",
               "--mode", "full", "--out", str(tmp_path), "--rep-ms", "1"])
    assert rc == 1
    assert "ERROR: torch_matgrad (auto->torch) at 7x33x17 bf16 none full: RuntimeError: kernel launch failed" in (
        capsys.readouterr().err)
    _, rows = _read_csv(tmp_path / "bench.csv")
    failed = [r for r in rows if r["provider"] == "torch_matgrad"]
    assert all(r["error"] == "RuntimeError: kernel launch failed" and r["median_ms"] == "" for r in failed)
    assert all(float(r["median_ms"]) > 0 and not r["error"] for r in rows if r["provider"] == "eager")
    assert (tmp_path / "tflops_tiny.png").exists()  # plotted from the rows that have times


def test_summary_is_a_geometric_mean():
    rows = [{"provider": "torch_matgrad", "mode": "full", "dtype": "bf16", "time_vs_eager": t} for t in ("0.5", "2.0", "1.0")]
    rows.append({"provider": "eager", "mode": "full", "dtype": "bf16", "time_vs_eager": "1.000"})
    ((provider, mode, dtype, mean, count),) = report.summary(rows)
    assert (provider, mode, dtype, count) == ("torch_matgrad", "full", "bf16", 3)
    assert mean == pytest.approx(1.0)


def test_cpu_timer_orders_and_interleaves():
    calls = []

    def sleeper(name, seconds):
        def step():
            calls.append(name)
            time.sleep(seconds)
        return step

    got = measure.time_cpu({"short": sleeper("short", 0.001), "long": sleeper("long", 0.006)}, rep_ms=50)
    assert got["short"][0] >= 1.0 and got["long"][0] >= 6.0
    assert got["long"][0] > got["short"][0]
    for median, p20, p80 in got.values():
        assert p20 <= median <= p80
    timed = calls[4:]  # after two warm-up calls each
    assert timed[:4] == ["short", "long", "long", "short"]  # order reversed every other round


def test_cpu_clock_ignores_sleep():
    # Process CPU time does not advance while the process waits (as when others run).
    def sleep():
        time.sleep(0.01)

    def spin():
        end = time.process_time() + 0.003
        while time.process_time() < end:
            pass

    got = measure.time_cpu({"sleep": sleep, "spin": spin}, rep_ms=20, clock=time.process_time)
    assert got["sleep"][0] < 2.0 and got["spin"][0] > 2.0


def test_inputs_rotate_past_the_cache():
    small = measure.input_sets(plans.Case("t", 8, 16, 8, "fp32", "none", "full"), "cpu")
    assert len(small) == measure._MAX_SETS
    assert not torch.equal(small[0][0], small[1][0])  # fresh activations per set
    assert small[0][1] is small[1][1] and isinstance(small[0][1], torch.nn.Parameter)  # one layer's weights
    assert all(t.requires_grad for t in small[0][:3]) and not small[0][3].requires_grad
    big = plans.Case("t", 4096, 4096, 1024, "fp32", "none", "full")  # x and grad_out: 84 MB, one set is enough
    assert len(measure.input_sets(big, "cpu")) == 1


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails as if not installed
    progress = report.Progress(2)
    progress.step("first")
    progress.step("second")
    progress.close()
    assert "[2/2] second" in capsys.readouterr().err


def test_forced_providers_set_their_backend_and_strategy():
    # Every forced provider enters its context (a GPU run once lost the G_z ones to a
    # broken import that no CPU test reached) and sets what its name says.
    pytest.importorskip("triton")
    from torch_matgrad import dispatch, triton_backend

    for name, (backend, gz) in providers._FORCED.items():
        with providers.provider_context(name):
            assert dispatch.requested_backend() == backend, name
            assert triton_backend._gz == (gz or "auto"), name
    assert triton_backend._gz == "auto"


@pytest.mark.slow
def test_compile_provider_runs_every_mode():
    # torch.compile's backward refuses retain_graph by default (donated buffers); the
    # backward mode must still time it. Default mode on CPU would take minutes to
    # autotune; a tiny shape takes seconds.
    env = environment.environment("cpu")
    for mode in plans.MODES:
        case = plans.Case("tiny", 7, 33, 17, "fp32", "gelu_tanh", mode)
        with providers.compile_config(mode):
            rows = measure.run_case(case, "cpu", ["eager", "compile"], functools.partial(measure.time_cpu, rep_ms=1), env)
        (compiled,) = [r for r in rows if r["provider"] == "compile"]
        assert not compiled["error"], compiled["error"]
        assert float(compiled["max_rel_diff_vs_eager"]) < 1e-5 and float(compiled["median_ms"]) > 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script is the real check, not a dry run")
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_dry_run(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable, "STAGES": "all"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DRY RUN" in done.stdout and "gpu_check: all stages passed" in done.stdout
    assert "not in STAGES" not in done.stdout
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert {"setup.log", "pytest.log", "bench.log"} <= files
    for run in ("quick", "decode"):
        assert {f"{run}/bench.csv", f"{run}/bench.md"} <= files
    assert {"products/product_choice.csv", "products/product_choice.md"} <= files
    # The tables are printed last, after every stage.
    assert done.stdout.index("| set | M x K x N") > done.stdout.index("== decode-bench")


def test_commit_recorded(monkeypatch):
    monkeypatch.delenv("TORCH_MATGRAD_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert environment._commit().startswith(head.stdout.strip())
    # A tree copied without .git (a GPU machine) is told its commit.
    monkeypatch.setenv("TORCH_MATGRAD_COMMIT", "0123abcd")
    assert environment.environment("cpu")["commit"] == "0123abcd"


@pytest.mark.cuda
def test_cuda_run_times_with_events_and_reports_peak_memory(tmp_path):
    rc = main(["bench", "--device", "cuda", "--shapes", "tiny", "--dtype", "bf16", "--activation", "none,silu",
               "--providers", "torch_matgrad,eager", "--out", str(tmp_path), "--rep-ms", "5", "--no-plot"])
    assert rc == 0
    _, rows = _read_csv(tmp_path / "bench.csv")
    assert rows and all(r["clock"] == "cuda events" and r["device_name"] == torch.cuda.get_device_name() for r in rows)
    assert all(float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]) for r in rows)
    assert all(float(r["peak_mem_mib"]) > 0 for r in rows if r["mode"] == "full")
    assert all(r["peak_mem_mib"] == "" for r in rows if r["mode"] != "full")


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_compile_provider_in_the_modes_that_replay_graphs():
    # max-autotune brings CUDA graphs; the backward mode replays retained autograd graphs
    # over rotating inputs. Both must run (or this says why not) before a long GPU run.
    env = {**environment.environment("cuda"), "clock": "cuda events"}
    timer = functools.partial(measure.time_cuda, rep_ms=5)
    for mode in ("backward", "full"):
        case = plans.Case("tiny", 64, 128, 96, "bf16", "gelu_tanh", mode)
        with providers.compile_config(mode):
            rows = measure.run_case(case, "cuda", ["eager", "compile"], timer, env)
        (compiled,) = [r for r in rows if r["provider"] == "compile"]
        assert not compiled["error"], compiled["error"]
        assert float(compiled["max_rel_diff_vs_eager"]) <= measure.MATCH_TOL[torch.bfloat16]


def test_host_mode_times_whole_layer_calls(tmp_path, monkeypatch, capsys):
    from torch_matgrad.bench import host

    monkeypatch.setitem(host.SHAPES, "cpu", [(1, 64, 64), (7, 33, 17)])
    rc = main(["bench", "--host", "--device", "cpu", "--activation", "none,silu", "--mode", "forward,full",
               "--threads", "1", "--clock", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    columns, rows = _read_csv(tmp_path / "host.csv")
    assert tuple(columns) == host.COLUMNS
    assert len(rows) == 2 * 2 * 2 * len(host.PROVIDERS)  # shapes x activations x modes x providers
    assert {r["mode"] for r in rows} == {"inference", "training"} and {r["provider"] for r in rows} == set(host.PROVIDERS)
    for r in rows:
        assert float(r["p20_us"]) <= float(r["median_us"]) <= float(r["p80_us"]) and r["clock"] == "cpu time"
        if r["provider"] == "nn.Linear":
            assert r["ratio_vs_nn_linear"] == "1.000"
    assert "| 7 x 33 x 17 | fp32 | silu | training |" in (tmp_path / "host.md").read_text()
    assert "ratio" in capsys.readouterr().out


def test_host_layers_compute_the_same_function():
    from torch_matgrad.bench import host

    for act in (None, "gelu_tanh"):
        ref, ours = host.layers(33, 17, act, "cpu", torch.float64).values()
        x = torch.randn(5, 33, dtype=torch.float64)
        assert torch.allclose(ref(x), ours(x), rtol=1e-12, atol=1e-12)
        assert ours.weight is (ref[0] if act else ref).weight


def test_generate_comparison_runs_and_checks_the_tokens(tmp_path, capsys):
    pytest.importorskip("transformers")
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "benchmarks" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    out = tmp_path / "generate.csv"
    assert generate.main(["--new-tokens", "4", "--rounds", "2", "--out", str(out)]) == 0
    assert "same tokens" in capsys.readouterr().out
    _, rows = _read_csv(out)
    assert len(rows) == 1 and float(rows[0]["ratio"]) > 0


def _interpreter() -> bool:
    try:
        from torch_matgrad import triton_backend
    except ImportError:
        return False
    return triton_backend.INTERPRET


def test_mlp_mode_times_and_counts_saved_bytes(tmp_path, monkeypatch, capsys):
    from torch_matgrad.bench import blocks

    from torch_matgrad.bench import peak

    monkeypatch.setitem(blocks.SHAPES, "cpu", [(33, 16, 40, 2)])
    monkeypatch.setitem(peak.RUNS, "cpu", 1)  # a fresh process per provider costs seconds
    providers = "torch_matgrad,matgrad_triton" if _interpreter() else "torch_matgrad"
    rc = main(["bench", "--mlp", "--device", "cpu", "--providers", providers, "--rep-ms", "5",
               "--out", str(tmp_path)])  # compiling would take minutes on a CPU; eager always runs
    assert rc == 0
    columns, rows = _read_csv(tmp_path / "mlp.csv")
    assert tuple(columns) == blocks.COLUMNS and len(rows) == 2 * (1 + providers.count(",") + 1)
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["saved_mib"]) > 0
        traced = r["provider"] in blocks.TRACED
        assert (r["tensor_peak_mib"] != "") == traced and (r["aten_ops"] != "") == traced
        # The resident set of a step in a fresh process (peak.spread's columns: tested below)
        assert r["peak_runs"] == "1" and r["peak_min_mib"] == r["peak_mib"] == r["peak_max_mib"]
        assert float(r["peak_mib"]) >= 0  # tiny: the step may fit in what the process already holds
        if traced:
            assert float(r["tensor_peak_mib"]) > 0 and int(r["aten_ops"]) > 0
        if r["provider"] != "eager":
            # x and the pre-activation(s) against eager's x, z and h (gated: x, g, act(g), u, h)
            per_token = {"plain_gelu": (16 + 40, 16 + 2 * 40), "gated_silu": (16 + 2 * 40, 16 + 4 * 40)}[r["kind"]]
            assert float(r["saved_vs_eager"]) == pytest.approx(per_token[0] / per_token[1], abs=1e-3)
    assert "| 33 x 16 x 40 | 2 | 0 | fp32 | gated_silu | torch_matgrad |" in (tmp_path / "mlp.md").read_text()


def test_lora_mode_runs_peft_against_the_fused_blocks(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from torch_matgrad.bench import blocks, peak

    monkeypatch.setitem(blocks.LORA_SHAPES, "cpu", [(33, 16, 40, 2, 4)])
    monkeypatch.setitem(peak.RUNS, "cpu", 1)
    rc = main(["bench", "--lora", "--device", "cpu", "--providers", "torch_matgrad", "--rep-ms", "5",
               "--out", str(tmp_path)])
    assert rc == 0
    columns, rows = _read_csv(tmp_path / "lora.csv")
    assert tuple(columns) == blocks.COLUMNS and [r["provider"] for r in rows] == ["eager", "torch_matgrad"]
    ours = rows[1]
    assert ours["rank"] == "4" and ours["kind"] == "gated_silu_lora" and float(ours["median_ms"]) > 0
    # PEFT's layers keep x, g, act(g), u, h and each adapter's A-output; the fused block
    # x, u, g and the three t: less, never h.
    assert 0 < float(ours["saved_vs_eager"]) < 0.75
    assert "Eager: PEFT's LoRA layers" in (tmp_path / "lora.md").read_text()


def test_peak_spread_is_median_lowest_highest_and_worst_against_the_baselines_lowest():
    from torch_matgrad.bench.peak import spread

    cols = spread({"eager": [100.0, 90.0, 120.0], "ours": [40.0, 60.0, 50.0]})
    assert cols["ours"] == {"peak_mib": "50.0", "peak_min_mib": "40.0", "peak_max_mib": "60.0",
                            "peak_vs_eager": "0.500", "worst_vs_eager": "0.667"}
    assert cols["eager"]["peak_vs_eager"] == "1.000" and cols["eager"]["worst_vs_eager"] == "1.333"
    assert spread({"eager": [0.0], "ours": [1.0]})["ours"]["worst_vs_eager"] == ""  # no ratio to nothing


def test_allocation_trace_counts_storages_as_cudas_allocator():
    from torch_matgrad.bench.allocations import AllocationTracker, block_bytes

    assert [block_bytes(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]
    before = torch.ones(1000)  # allocated before the trace: never counted
    with AllocationTracker() as t:
        a = torch.ones(1000)  # 4000 bytes: a 4096-byte block
        view = a[10:]  # a view shares the storage
        b = torch.zeros(10)  # 40 bytes: 512
        before.add_(a)  # in place: nothing new
        c = a * 2  # 4096 more: the peak
        torch.mul(a, 3, out=c)  # out=: c's storage, already counted
        assert (t.current, t.peak) == (8704, 8704)
        del c
        del a
        assert t.current == 4608  # the view keeps a's storage
        del view, b
    assert (t.current, t.peak) == (0, 8704) and t.ops >= 6


def test_allocation_trace_of_the_eager_blocks_step_is_computable_by_hand():
    # Eager plain GELU, fp32, M x d x H = 64 x 32 x 128: the forward keeps z, h (M x H)
    # and out (M x d); the down layer's backward adds grad_h (M x H) and grad_Wd (d x H)
    # before its bias sum (d floats: one 512-byte block), which is the step's peak.
    from torch_matgrad.bench import blocks
    from torch_matgrad.bench.allocations import step_allocations

    m, d, hidden = 64, 32, 128
    model = blocks.blocks(d, hidden, 1, "plain_gelu", "cpu", torch.float32, ["eager"])["eager"]
    x, grad = torch.randn(m, d, requires_grad=True), torch.randn(m, d)
    peak, ops = step_allocations(lambda: torch.autograd.grad(model(x), [x, *model.parameters()], grad))
    assert peak == 4 * (3 * m * hidden + m * d + d * hidden) + 512
    assert ops == 22  # forward 5 (t, addmm, gelu, t, addmm), backward 17


@pytest.mark.slow  # 18 fresh processes
def test_lm_head_mode_times_and_measures_peak_memory(tmp_path, monkeypatch):
    from torch_matgrad.bench import lm_head, peak

    n, h, v = 64, 256, 1000
    monkeypatch.setitem(lm_head.SHAPES, "cpu", [(n, h, v)])
    monkeypatch.setitem(lm_head.MODEL_SHAPES, "cpu", [(2, 8, 32, 1, v)])
    monkeypatch.setitem(peak.RUNS, "cpu", 3)
    rc = main(["bench", "--lm-head", "--device", "cpu", "--providers", "torch_matgrad", "--rep-ms", "5",
               "--out", str(tmp_path)])  # compiling would take minutes on a CPU; eager always runs
    assert rc == 0
    columns, all_rows = _read_csv(tmp_path / "lm_head.csv")
    assert tuple(columns) == lm_head.COLUMNS
    rows, model = all_rows[:3], all_rows[3:]
    assert [r["provider"] for r in rows] == ["eager", "torch_matgrad", "matgrad_recompute"]
    # The model's rows: without the compiled providers, the model as it comes and fused,
    # the same loss and gradients, 16 tokens, no working columns.
    assert [r["provider"] for r in model] == ["llama", "llama_fused"]
    for r in model:
        assert (r["N"], r["H"], r["V"]) == ("16", "32", str(v)) and r["working_mib"] == r["working_vs_eager"] == ""
        assert float(r["peak_min_mib"]) <= float(r["peak_mib"]) <= float(r["peak_max_mib"])
        assert float(r["max_rel_diff_vs_eager"]) <= 1e-5 and float(r["median_ms"]) > 0
    assert model[0]["time_vs_eager"] == "1.000" and model[0]["peak_vs_eager"] in ("1.000", "")
    grads_mib = (n * h + v * h) * 4 / 2**20  # grad_x and grad_W in fp32: 1.04 MiB, which working leaves out
    eager_working = float(rows[0]["working_mib"])
    assert eager_working > 0.3  # eager holds its logits, their fp32 copy and G_z besides the gradients
    eager_lowest = float(rows[0]["peak_min_mib"])
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["peak_runs"] == "3"
        lowest, median, highest = (float(r[c]) for c in ("peak_min_mib", "peak_mib", "peak_max_mib"))
        assert 0 <= lowest <= median <= highest  # the median of three runs is one of them
        worst = highest / eager_lowest  # of the printed values: within what their rounding allows, as below
        assert float(r["worst_vs_eager"]) == pytest.approx(worst, abs=0.051 * (1 + worst) / (eager_lowest - 0.05))
        assert float(r["max_rel_diff_vs_eager"]) <= 1e-5
        working = float(r["working_mib"])
        assert working == pytest.approx(float(r["peak_mib"]) - grads_mib, abs=0.11)  # both printed to 0.1 MiB
        # The ratio is of the unrounded values: each printed MiB is within 0.05 of its own.
        ratio = working / eager_working
        assert float(r["working_vs_eager"]) == pytest.approx(ratio, abs=0.051 * (1 + ratio) / (eager_working - 0.05))
    assert f"| {n} x {h} x {v} | fp32 | torch_matgrad |" in (tmp_path / "lm_head.md").read_text()
