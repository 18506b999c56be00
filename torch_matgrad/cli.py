"""What the command-line tools share: the spelling of activations, the backends this
machine can run (Triton's interpreter in a child process included), tables printed a
row at a time, and help text without reStructuredText markup."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from .formulas import ACTIVATION_NAMES, canonical_activation  # noqa: F401 (how commands spell them)


def activation(name: str) -> Optional[str]:
    """The op's ``activation`` argument for a command-line name (any case)."""
    return canonical_activation(name)


def activation_name(act: Optional[str]) -> str:
    """The command-line name of the op's ``activation`` argument."""
    return "none" if act is None else act


def plain(text: str) -> str:
    """``text`` without reStructuredText markup (``literal``, :func:`name`), for --help."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    return re.sub(r"``([^`]*)``", r"\1", text)


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> List[Tuple[str, str]]:
    """``(backend, device)`` pairs this process can run. ``("triton", "cpu")`` is
    Triton's interpreter, listed only when ``TRITON_INTERPRET=1`` is set (it must be on
    before the kernels are imported); :func:`rows_on_every_backend` adds it otherwise."""
    pairs = [("torch", "cpu")]
    if has_triton() and os.environ.get("TRITON_INTERPRET") == "1":
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available():
        pairs += [("torch", "cuda")] + ([("triton", "cuda")] if has_triton() else [])
    return pairs


#: Triton's interpreter on the CPU: ``(backend, device)`` of its rows.
INTERPRETER = ("triton", "cpu")


def planned_backends(interpreter: bool = True) -> List[Tuple[str, str]]:
    """The ``(backend, device)`` pairs :func:`rows_on_every_backend` runs, in order:
    :func:`available_backends`, then the interpreter (in a child process when it is off
    here) where Triton is installed, unless ``interpreter`` is False."""
    pairs = [p for p in available_backends() if interpreter or p != INTERPRETER]
    if interpreter and has_triton() and INTERPRETER not in pairs:
        pairs.append(INTERPRETER)
    return pairs


def rows_on_every_backend(rows: Callable[..., Iterator[tuple]], *args, interpreter: bool = True) -> Iterator[tuple]:
    """``rows(backend, device, *args)`` for every pair of :func:`planned_backends`, the
    interpreter's in a child process that switches it on when it is off here. Rows are
    yielded as they are computed; ``rows`` must be a module-level function and ``args`` JSON."""
    here = available_backends()
    for backend, device in planned_backends(interpreter):
        if (backend, device) in here:
            yield from rows(backend, device, *args)
        else:
            yield from _child_rows(rows, backend, device, *args)


_CHILD = """
import importlib, json, sys
module, name, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for row in getattr(importlib.import_module(module), name)(*args):
    print(json.dumps(row), flush=True)
"""


def _child_rows(rows: Callable, *args) -> Iterator[tuple]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-c", _CHILD, rows.__module__, rows.__name__, json.dumps(args)]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            yield tuple(json.loads(line))
    if child.returncode:
        raise RuntimeError(f"the Triton interpreter's rows: the child process exited with {child.returncode}")


class Table:
    """A text table printed a row at a time (long checks show progress): column widths
    are fixed up front from the headers and the widest value each column expects."""

    def __init__(self, columns: Sequence[str], widest: Sequence[int]):
        self.widths = [max(len(c), w) for c, w in zip(columns, widest)]
        self._print(columns)
        print("-+-".join("-" * w for w in self.widths), flush=True)

    def _print(self, cells: Sequence[object]) -> None:
        print(" | ".join(str(c).ljust(w) for c, w in zip(cells, self.widths)).rstrip(), flush=True)

    def row(self, cells: Sequence[object]) -> None:
        self._print(cells)
