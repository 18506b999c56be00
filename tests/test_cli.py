"""The command-line tools: ``check`` runs each row's backend in both halves and prints
rows as they finish, ``jacobian`` adds the interpreter's rows by itself, one spelling of
activations everywhere, ``--help`` lists every choice, ``bench`` never rewrites committed
results by default, and a bad ``$TORCH_MATGRAD_BACKEND`` says what is wrong."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_matgrad as mg
from torch_matgrad import check, cli, jacobian_cli
from torch_matgrad.bench import environment, plans, providers
from torch_matgrad.__main__ import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- check


@pytest.mark.kernels
def test_check_triton_rows_reach_the_triton_backward(monkeypatch):
    pytest.importorskip("triton")
    from torch_matgrad import triton_backend

    if not (torch.cuda.is_available() or triton_backend.INTERPRET):
        pytest.skip("no way to run the Triton kernels here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Count kernel launches made inside the Triton backend's backward.
    launches = {"forward": 0, "backward": 0}
    inside = []
    launch, backward = triton_backend.fused_matmul, triton_backend.backward

    def counted_launch(*args, **kwargs):
        launches["backward" if inside else "forward"] += 1
        return launch(*args, **kwargs)

    def counted_backward(*args):
        inside.append(True)
        try:
            return backward(*args)
        finally:
            inside.pop()

    monkeypatch.setattr(triton_backend, "fused_matmul", counted_launch)
    monkeypatch.setattr(triton_backend, "backward", counted_backward)
    monkeypatch.setattr(check, "ACTIVATIONS", ("gelu",))  # two rows: with and without bias
    rows = list(check.check_backend("triton", device))
    assert [r[7] for r in rows] == ["triton/triton"] * 2
    assert all(check.passed(r) for r in rows)
    # gradcheck's analytical backward: one grad_x and one grad_W(+grad_b) launch per
    # input; the fp32 comparison adds its own. Nothing near zero passes.
    assert launches["backward"] >= 8 and launches["forward"] >= 8, launches


def test_check_fails_a_row_whose_backward_ran_elsewhere():
    row = ("triton", "cpu", "gelu", "yes", True, True, 1e-7, "triton/torch")
    assert not check.passed(row)
    assert check.passed(row[:7] + ("triton/triton",))


def test_check_prints_each_row_as_it_finishes(monkeypatch, capsys):
    printed = []

    def rows(function, *args, interpreter):
        for op in ("none", "lm-head mean"):
            printed.append(capsys.readouterr().out)  # what was on screen before this row
            yield ("torch", "cpu", op, "yes", True, True, 1e-7, "torch/torch")

    monkeypatch.setattr(check, "rows_on_every_backend", rows)
    assert check.run(argparse.Namespace(seed=0, no_interpreter=False)) == 0
    assert "backend" in printed[0] and "torch/torch" in printed[1]  # row 1 shown before row 2 ran
    rest = capsys.readouterr().out
    assert "2 passed, 0 failed" in rest
    table = [line for line in "".join([*printed, rest]).splitlines() if " | " in line]
    columns = [[i for i, c in enumerate(line) if c == "|"] for line in table]
    assert len(table) == 3 and columns[1] == columns[2] == columns[0], table  # the columns line up


@pytest.mark.parametrize("interpreter", [True, False])
def test_check_says_what_it_will_run_and_can_leave_the_interpreter_out(interpreter, monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    asked = []

    def rows(function, *args, interpreter):
        asked.append(interpreter)
        yield ("torch", "cpu", "none", "yes", True, True, 1e-7, "torch/torch")

    monkeypatch.setattr(check, "rows_on_every_backend", rows)
    assert check.run(argparse.Namespace(seed=0, no_interpreter=not interpreter)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("check: 13 rows of torch on cpu (~3 s)") and asked == [interpreter]
    assert ("13 rows of triton under Triton's interpreter (~39 s); --no-interpreter leaves" in first) == interpreter
    assert (cli.INTERPRETER in cli.planned_backends(interpreter)) == interpreter


def test_readme_states_the_interpreter_rows_time_the_check_announces():
    announced = int(re.search(r"interpreter \(~(\d+) s\)", check._plan([cli.INTERPRETER])).group(1))
    said = int(re.search(r"under Triton's interpreter and take about (\d+) s", " ".join(
        (ROOT / "README.md").read_text().split())).group(1))
    assert abs(said - announced) <= 0.25 * announced, (said, announced)
    help_text = " ".join(_parser("check").format_help().split())
    assert f"about {check._ROW_SECONDS['triton']:.0f} s a row" in help_text


def test_jacobian_adds_the_interpreter_rows_by_itself(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = list(cli.rows_on_every_backend(jacobian_cli.three_way_rows, 2, 3, 2, 0))
    pairs = {(r[0], r[1]) for r in rows}
    assert ("torch", "cpu") in pairs and ("triton", "cpu") in pairs  # the child's rows
    assert all(max(r[3], r[4]) <= jacobian_cli.TOLERANCE for r in rows)
    assert {r[2] for r in rows if r[0] == "triton"} == set(cli.ACTIVATION_NAMES)


# ------------------------------------------------------------------- options


def _parser(command):
    parser = argparse.ArgumentParser(prog=command)
    __import__(COMMANDS[command], fromlist=["configure"]).configure(parser)
    return parser


@pytest.mark.parametrize("name", cli.ACTIVATION_NAMES)
def test_every_command_spells_activations_the_same(name):
    assert _parser("jacobian").parse_args(["--activation", name]).activation == name
    assert _parser("bench").parse_args(["--activation", name]).activation == [name]
    assert cli.activation(name) in mg.ACTIVATIONS and cli.activation_name(cli.activation(name)) == name


@pytest.mark.parametrize("command", ["jacobian", "bench"])
@pytest.mark.parametrize("spelling, name", [("NONE", "none"), ("None", "none"), ("GELU", "gelu"), ("Gelu_Tanh", "gelu_tanh")])
def test_commands_take_names_in_any_case(command, spelling, name):
    parsed = _parser(command).parse_args(["--activation", spelling]).activation
    assert parsed == (name if command == "jacobian" else [name])


@pytest.mark.parametrize("command", ["jacobian", "bench"])
@pytest.mark.parametrize("spelling", ["identity", "tanh", "gelu-tanh"])
def test_other_spellings_are_refused_with_the_choices(command, spelling, capsys):
    with pytest.raises(SystemExit):
        _parser(command).parse_args(["--activation", spelling])
    assert "none, relu, gelu, gelu_tanh, silu" in capsys.readouterr().err.replace("'", "").replace(",  ", ", ")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_choice_without_markup(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    for action in _parser(command)._actions:
        if action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings} has no help text"
        if action.choices:
            assert all(str(c) in text for c in action.choices)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def _quick_cases(device):
    return plans.plan(argparse.Namespace(quick=True, shapes=None, dtype=None, activation=None, mode=None), device)


def test_quick_help_and_docs_state_what_quick_runs():
    text = " ".join(_parser("bench").format_help().split())
    start = text.index("--quick the quick set:")
    quick = text[start:text.index(" --device", start)]
    performance = (ROOT / "docs" / "performance.md").read_text()
    line = performance.split("bench --quick", 1)[1].split("\n")[0]
    docs = {name: (dtype, count) for name, dtype, count in re.findall(r"(CUDA|CPU): (\w+), (\d+) shapes", line)}
    for device, name in (("cuda", "CUDA"), ("cpu", "CPU")):
        cases = _quick_cases(device)
        shapes, dtypes = {(c.m, c.k, c.n) for c in cases}, {c.dtype for c in cases}
        said = quick.split(f"on {name} ", 1)[1].split(";")[0]
        assert said.startswith(f"{len(shapes)} shapes") and len(dtypes) == 1
        assert [d for d in plans.DTYPES if d in said] == sorted(dtypes)
        for mode in {c.mode for c in cases}:
            acts = ", ".join(dict.fromkeys(c.activation for c in cases if c.mode == mode))
            assert f"{mode} ({acts})" in said
        assert docs[name] == (*dtypes, str(len(shapes)))  # the docs' summary, too


def test_bench_choices_appear_in_help():
    text = _parser("bench").format_help()
    for choices in (plans.DTYPES, cli.ACTIVATION_NAMES, plans.MODES, plans.SHAPE_SETS, providers.PROVIDERS):
        assert all(c in " ".join(text.split()) for c in choices)


# ------------------------------------------------------------------- bench output


def test_bench_writes_a_fresh_ignored_folder_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--device", "cpu", "--shapes", "tiny", "--dtype", "fp32", "--activation", "relu",
            "--mode", "forward", "--rep-ms", "1", "--no-plot"]
    assert main(argv) == 0 and main(argv) == 0
    runs = sorted((tmp_path / environment.DEFAULT_OUT).iterdir())
    assert len(runs) == 2 and all(r.name.startswith("cpu-") and (r / "bench.csv").exists() for r in runs)
    err = capsys.readouterr().err
    assert all(f"results in {r.relative_to(tmp_path)}/" in err for r in runs)
    assert not (tmp_path / "benchmarks" / "results").exists()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(environment.DEFAULT_OUT / "cpu-x" / "bench.csv")], cwd=ROOT)
    if ignored.returncode != 128:  # 128: not a git checkout (an sdist)
        assert ignored.returncode == 0, "the default output folder must be ignored by git"


# ------------------------------------------------------------------- backend names


@pytest.mark.parametrize("value", ["bogus", "Cuda"])
def test_bad_backend_variable_names_itself(backend_env, value):
    backend_env(value)
    with pytest.raises(ValueError, match=rf"\$TORCH_MATGRAD_BACKEND='{value}' names no backend; choose one of "
                                         r"'auto', 'torch', 'triton' \(any case\)"):
        mg.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_the_variable_and_use_backend_take_names_alike(backend_env):
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    for name in ("Torch", " TORCH ", "torch"):
        backend_env(name)
        assert mg.dispatch.requested_backend() == "torch"
        backend_env(None)
        with mg.use_backend(name):
            assert mg.dispatch.requested_backend() == "torch"
            mg.linear(x, w)
    backend_env("")
    assert mg.dispatch.requested_backend() == "auto"


def test_the_variable_is_read_once(backend_env):
    backend_env("torch")
    assert mg.dispatch.requested_backend() == "torch"
    os.environ["TORCH_MATGRAD_BACKEND"] = "bogus"  # too late: read on import (read_env reads again)
    assert mg.dispatch.requested_backend() == "torch"
    with pytest.raises(ValueError, match=r"use_backend\('Tritn'\) names no backend"):
        with mg.use_backend("Tritn"):
            pass


# ------------------------------------------------------------------- the example


def test_example_flags_have_help_and_cuda_without_cuda_is_one_line():
    example = ROOT / "examples" / "swap_into_transformer.py"
    helped = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for flag in ("--steps", "--device", "--autocast", "--threads"):
        line = helped.stdout[helped.stdout.index(flag):].split("\n--")[0]
        assert len(line.split()) > 3, f"{flag} has no help text"
    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, str(example), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("--device cuda, but this torch "
                                                         f"{torch.__version__} sees no CUDA device")
