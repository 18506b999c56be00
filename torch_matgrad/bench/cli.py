"""``python -m torch_matgrad bench``: options and the run."""

from __future__ import annotations

import argparse
import csv
import functools
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List

import torch

from ..cli import ACTIVATION_NAMES
from . import blocks, host, lm_head, peak
from .environment import DEFAULT_OUT, default_out, environment
from .measure import CLOCKS, failures, run_case, time_cpu, time_cuda
from .plans import ALL_SETS, DEFAULT_ACTIVATIONS, DTYPES, MODES, SHAPE_SETS, plan
from .providers import DEFAULT_PROVIDERS, PROVIDERS, compile_config
from .report import CSV_COLUMNS, Progress, plot, report

_HOST_ROUNDS = 15


def quick_help() -> str:
    """``--quick``'s help, read from the cases :func:`plans.plan` runs for it."""
    parts = []
    for device, name in (("cuda", "CUDA"), ("cpu", "CPU")):
        cases = plan(argparse.Namespace(quick=True, shapes=None, dtype=None, activation=None, mode=None), device)
        shapes = {(c.m, c.k, c.n) for c in cases}
        modes = {}
        for c in cases:
            modes.setdefault(c.mode, {})[c.activation] = None  # in the plan's order
        parts.append(
            f"on {name} {len(shapes)} shapes ({', '.join(dict.fromkeys(c.shape_set for c in cases))}) in "
            f"{', '.join(dict.fromkeys(c.dtype for c in cases))}, modes (activations): "
            + ", ".join(f"{mode} ({', '.join(acts)})" for mode, acts in modes.items())
        )
    return "the quick set: " + "; ".join(parts)


def configure(parser: argparse.ArgumentParser) -> None:
    def listed(choices):
        def parse(text):
            items = [s.strip().lower() for s in text.split(",") if s.strip()]  # names in any case
            bad = [s for s in items if s not in choices]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
            return items

        return parse

    parser.add_argument("--host", action="store_true",
                        help="host overhead: whole layer calls (torch_matgrad.Linear against nn.Linear + "
                        "activation) at tiny and decoding shapes, inference (--mode forward) and training "
                        "(--mode full), into host.csv and host.md; best with --threads 1 --clock cpu on a CPU")
    parser.add_argument("--mlp", action="store_true",
                        help="MLP blocks: torch_matgrad.FusedMLP against the eager block and torch.compile of "
                        "both, plain GELU and gated SiLU, a training step's time, the bytes saved for backward and "
                        "the peak memory (a CPU: each provider in fresh processes), into mlp.csv and mlp.md; --dtype "
                        "picks one dtype, --providers narrows eager,torch_matgrad,compile (compile also compiles "
                        "the fused block)")
    parser.add_argument("--lora", action="store_true",
                        help="LoRA blocks: fuse_mlps on Llama MLP blocks with PEFT's LoRA on gate, up and down "
                        "against PEFT's layers, and torch.compile of both, the same columns as --mlp, into lora.csv "
                        "and lora.md (needs peft and transformers)")
    parser.add_argument("--lm-head", action="store_true",
                        help="LM head and loss: torch_matgrad.linear_cross_entropy against F.linear + "
                        "F.cross_entropy and torch.compile of it, a training step's time and peak memory (each "
                        "provider in fresh processes), and a small Llama's step before and after "
                        "fuse_lm_head_loss, into lm_head.csv and lm_head.md; --dtype picks one dtype, --providers "
                        "narrows eager,torch_matgrad,matgrad_triton,compile (compile also compiles the op and the "
                        "fused model)")
    parser.add_argument("--quick", action="store_true",
                        help=quick_help())
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto, cpu or cuda (default auto: cuda when available)")
    parser.add_argument("--dtype", type=listed(tuple(DTYPES)),
                        help=f"comma list of {', '.join(DTYPES)} (default all)")
    parser.add_argument("--activation", type=listed(ACTIVATION_NAMES),
                        help=f"comma list of {', '.join(ACTIVATION_NAMES)} (default {','.join(DEFAULT_ACTIVATIONS)})")
    parser.add_argument("--mode", type=listed(MODES), help=f"comma list of {', '.join(MODES)} (default all)")
    parser.add_argument("--shapes", type=listed(tuple(SHAPE_SETS) + ("all",)),
                        help=f"comma list of shape sets: {', '.join(SHAPE_SETS)}, all "
                        f"(= {', '.join(ALL_SETS)}; default: all on CUDA, cpu on CPU)")
    parser.add_argument("--providers", type=listed(PROVIDERS),
                        help=f"comma list of {', '.join(PROVIDERS)} (default {','.join(DEFAULT_PROVIDERS)} "
                        "on CUDA; torch_matgrad,eager on CPU)")
    parser.add_argument("--out", type=Path,
                        help=f"output folder (default: a new {DEFAULT_OUT}/<device>-<UTC time>, ignored by git; "
                        "the committed results are rewritten only when named here)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's own choice); one thread keeps CPU "
                        "figures steady on a machine that other work shares")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="CPU only: wall (default) or cpu, this process's CPU time, which other "
                        "processes on a shared machine do not inflate; meaningful with --threads 1 "
                        "(with more threads it adds up their time, spinning included)")
    parser.add_argument("--rep-ms", type=float,
                        help="timing budget: per provider and case on CUDA (default 100), "
                        "per case for all providers together on CPU (default 1000)")
    parser.add_argument("--peak-runs", type=int,
                        help="--mlp, --lora, --lm-head: fresh processes measuring each provider's peak "
                        f"(default {peak.RUNS['cpu']} on a CPU, {peak.RUNS['cuda']} on CUDA)")



def run(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = args.providers or (list(DEFAULT_PROVIDERS) if device == "cuda" else ["torch_matgrad", "eager"])
    if device == "cuda":
        timer, clock = functools.partial(time_cuda, rep_ms=args.rep_ms or 100.0), "cuda events"
    else:
        timer = functools.partial(time_cpu, rep_ms=args.rep_ms or 1000.0, clock=CLOCKS[args.clock])
        clock = f"{args.clock} time"
    env = {**environment(device), "clock": clock}
    if args.peak_runs:
        peak.RUNS[device] = args.peak_runs
    out = args.out or default_out(device, env)
    out.mkdir(parents=True, exist_ok=True)
    if args.host:
        return run_host(args, device, env, out)
    if args.mlp or args.lora:
        return run_mlp(args, device, env, out, timer)
    if args.lm_head:
        return run_lm_head(args, device, env, out, timer)
    cases = plan(args, device)
    started = time.perf_counter()
    print(f"bench: {len(cases)} cases x {len(providers)} providers on {env['device_name']}; writing {out}/",
          file=sys.stderr)

    rows: List[dict] = []
    progress = Progress(len(cases))
    stop = threading.Event()

    def measure_cases():
        with open(out / "bench.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for case in cases:
                with compile_config(case.mode):
                    new = run_case(case, device, providers, timer, env)
                if stop.is_set():
                    return
                writer.writerows(new)
                f.flush()
                rows.extend(new)
                progress.step(f"{case.m}x{case.k}x{case.n} {case.dtype} {case.activation} {case.mode}")

    interrupted = until_interrupted(measure_cases, stop)
    progress.close()
    rows = list(rows)
    if interrupted:
        print(f"bench: interrupted; reporting the {progress.done} of {len(cases)} cases that finished",
              file=sys.stderr)

    (out / "bench.md").write_text(report(rows, markdown=True))
    print(report(rows))
    if not args.no_plot:
        try:
            written = plot(rows, out)
        except ImportError:
            print("bench: matplotlib is not installed (pip install torch-matgrad[bench]); no plots", file=sys.stderr)
        else:
            print("plots: " + ", ".join(map(str, written)))
    bad = failures(rows)
    for line in bad:
        print(line, file=sys.stderr)
    print(f"bench: {len(cases)} cases in {time.perf_counter() - started:.0f} s; results in {out}/", file=sys.stderr)
    return 130 if interrupted else 1 if bad else 0


def until_interrupted(work: Callable[[], None], stop: threading.Event) -> bool:
    """Run ``work`` in a worker thread until it ends (False) or Ctrl-C comes (True, with
    ``stop`` set for ``work`` to see). A step can sit in one C++ op for seconds (a bf16
    GEMM on a CPU without bf16 arithmetic: 18 s at 256 x 4096 x 1024), where Python cannot
    take the signal; the main thread waits in short joins instead and takes it at once.
    The worker is a daemon: a step still running when the report is written ends with
    the process."""
    failed: List[BaseException] = []

    def target():
        try:
            work()
        except BaseException as e:  # re-raised in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=target, name="bench-cases", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        return True
    if failed:
        raise failed[0]
    return False


def run_host(args, device: str, env: dict, out: Path) -> int:
    """``--host``: see :mod:`torch_matgrad.bench.host`."""
    dtype_names = args.dtype or (["bf16"] if device == "cuda" else ["fp32"])
    modes = [host.FROM_BENCH_MODE[m] for m in (args.mode or ()) if m in host.FROM_BENCH_MODE] or list(host.MODES)
    clock = CLOCKS[args.clock] if device == "cpu" else CLOCKS["wall"]
    print(f"bench --host: {len(host.SHAPES[device])} shapes on {env['device_name']}; writing {out}/", file=sys.stderr)
    rows = host.run(device, env, out, {d: DTYPES[d] for d in dtype_names}, args.activation or ["none", "gelu_tanh"],
                    modes, clock, _HOST_ROUNDS)
    print(host.report(rows))
    print(f"bench --host: results in {out}/", file=sys.stderr)
    return 0


def run_mlp(args, device: str, env: dict, out: Path, timer) -> int:
    """``--mlp`` and ``--lora``: see :mod:`torch_matgrad.bench.blocks`."""
    dtype_name = (args.dtype or ["bf16" if device == "cuda" else "fp32"])[0]
    mode, shapes = ("--lora", blocks.LORA_SHAPES) if args.lora else ("--mlp", blocks.SHAPES)
    print(f"bench {mode}: {len(shapes[device])} shapes on {env['device_name']}; writing {out}/", file=sys.stderr)
    # --providers narrows the blocks' providers (eager, torch_matgrad, matgrad_triton,
    # compile): compiling takes tens of seconds per case, more than a short GPU run can
    # spend. The Triton kernels run CPU tensors only under the interpreter: asked for there only.
    default = [p for p in blocks.PROVIDERS if device == "cuda" or p != "matgrad_triton"]
    wanted = set(args.providers or default)
    providers = [p for p in blocks.PROVIDERS if p in wanted or (p == "compile_matgrad" and "compile" in wanted)]
    if "eager" not in providers:
        providers.insert(0, "eager")  # the baseline of every ratio
    rows = blocks.run(device, env, out, dtype_name, DTYPES[dtype_name], providers, timer, lora=args.lora)
    print(blocks.report(rows))
    print(f"bench {mode}: results in {out}/", file=sys.stderr)
    return 0


def run_lm_head(args, device: str, env: dict, out: Path, timer) -> int:
    """``--lm-head``: see :mod:`torch_matgrad.bench.lm_head`."""
    dtype_name = (args.dtype or ["bf16" if device == "cuda" else "fp32"])[0]
    print(f"bench --lm-head: {len(lm_head.SHAPES[device])} shapes on {env['device_name']}; writing {out}/",
          file=sys.stderr)
    # matgrad_recompute runs with torch_matgrad, matgrad_kernels with matgrad_triton; the
    # kernels run CPU tensors only under the interpreter: asked for there only. eager is
    # the baseline of every ratio.
    wanted = set(args.providers or [p for p in lm_head.PROVIDERS if device == "cuda" or p not in lm_head.TRITON])
    wanted |= {"eager"} | ({"matgrad_recompute"} if "torch_matgrad" in wanted else set())
    wanted |= set(lm_head.TRITON) if "matgrad_triton" in wanted else set()
    wanted |= {"compile_matgrad"} if "compile" in wanted else set()  # as --mlp: both sides compiled
    rows = lm_head.run(device, env, out, dtype_name, [p for p in lm_head.PROVIDERS if p in wanted], timer)
    print(lm_head.report(rows))
    print(f"bench --lm-head: results in {out}/", file=sys.stderr)
    return 0
