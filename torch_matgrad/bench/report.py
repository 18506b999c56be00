"""Reports: the CSV columns, progress, per-case tables, geometric means and plots."""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .providers import BASELINE

CSV_COLUMNS = (
    "date", "commit", "device", "device_name", "torch", "triton", "clock", "shape_set", "M", "K", "N", "dtype",
    "activation", "mode", "provider", "backend", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_mib",
    "time_vs_eager", "graph_ms", "graph_vs_eager", "first_call_s", "max_rel_diff_vs_eager", "error",
)



class Progress:
    """tqdm when installed, otherwise a line on stderr per case with the time spent and an
    estimate of the time left (rewritten in place on a terminal)."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, unit="case", file=sys.stderr)
        self.total, self.done = total, 0
        self._start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update()
            return
        spent = time.perf_counter() - self._start
        line = f"[{self.done}/{self.total}] {label}: {spent:.0f} s, ~{spent / self.done * (self.total - self.done):.0f} s left"
        if sys.stderr.isatty():
            print(f"\r{line:<78}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif sys.stderr.isatty():
            print(file=sys.stderr)



def _case_key(r: dict) -> tuple:
    return (r["shape_set"], int(r["M"]), int(r["K"]), int(r["N"]), r["dtype"], r["activation"], r["mode"])


def pivot(rows: Sequence[dict]) -> Tuple[List[str], List[List[str]]]:
    """One line per case: time and TFLOP/s per provider, time relative to eager; on CUDA
    also the time of the step replayed from a CUDA graph and its ratio (the kernels'
    share apart from the host's)."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    graphs = any(r.get("graph_ms") for r in rows)
    header = ["set", "M x K x N", "dtype", "act", "mode"]
    for p in providers:
        header += [f"{p} ms", f"{p} TFLOP/s"] + ([f"{p}/eager"] if p != BASELINE else [])
        if graphs:
            header += [f"{p} graph ms"] + ([f"{p}/eager graph"] if p != BASELINE else [])
    lines = []
    for key, group in itertools.groupby(rows, key=_case_key):
        by = {r["provider"]: r for r in group}
        line = [key[0], f"{key[1]} x {key[2]} x {key[3]}", *key[4:]]
        for p in providers:
            r = by.get(p)
            line += ([r["median_ms"] or "error", r["tflops"]]) if r else ["", ""]
            if p != BASELINE:
                line.append(r["time_vs_eager"] if r else "")
            if graphs:
                line += [r.get("graph_ms", "") if r else ""] + ([r.get("graph_vs_eager", "") if r else ""]
                                                                 if p != BASELINE else [])
        lines.append(line)
    return header, lines


def summary(rows: Sequence[dict]) -> List[Tuple[str, str, str, float, int]]:
    """``(provider, mode, dtype, geometric mean of time/eager, cases)`` over all shapes
    and activations: below 1 is faster than eager."""
    groups: Dict[tuple, List[float]] = {}
    for r in rows:
        if r["provider"] != BASELINE and r["time_vs_eager"]:
            groups.setdefault((r["provider"], r["mode"], r["dtype"]), []).append(float(r["time_vs_eager"]))
    return [(*k, math.exp(sum(map(math.log, v)) / len(v)), len(v)) for k, v in groups.items()]


def format_table(header: Sequence[str], lines: Sequence[Sequence[str]], markdown: bool = False) -> str:
    if markdown:
        rows = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows)
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    text = [" ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *lines]]
    text.insert(1, " ".join("-" * w for w in widths))
    return "\n".join(text)


def heading(env: dict, markdown: bool = False) -> str:
    """The line above every report: device, versions, commit, date and clock."""
    head = (f"{env['device_name']} ({env['device']}); torch {env['torch']}, triton {env['triton']}; "
            f"commit {env['commit']}; {env['date']}; timed by {env['clock']}")
    return f"**{head}**" if markdown else head


def report(rows: Sequence[dict], markdown: bool = False) -> str:
    """The environment, the per-case table and the geometric means, as text or Markdown."""
    means = [("provider", "mode", "dtype", "geomean time / eager", "cases")] + [
        (p, m, d, f"{g:.3f}", str(c)) for p, m, d, g, c in summary(rows)
    ]
    parts = [
        heading(rows[0], markdown),
        format_table(*pivot(rows), markdown=markdown),
        "Geometric mean over the cases of time relative to eager (below 1: faster):",
        format_table(means[0], means[1:], markdown=markdown),
    ]
    return "\n\n".join(parts) + "\n"


def plot(rows: Sequence[dict], out: Path) -> List[Path]:
    """``tflops_<set>.png`` per shape set in ``triton.testing.perf_report``'s style:
    TFLOP/s against shape, one line per provider, a panel per (mode, dtype, activation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for shape_set in dict.fromkeys(r["shape_set"] for r in rows if r["tflops"]):
        mine = [r for r in rows if r["shape_set"] == shape_set and r["tflops"]]
        panels = list(dict.fromkeys((r["mode"], r["dtype"], r["activation"]) for r in mine))
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
        for ax, (mode, dtype, act) in zip(axes.flat, panels):
            sel = [r for r in mine if (r["mode"], r["dtype"], r["activation"]) == (mode, dtype, act)]
            shapes = sorted({(int(r["M"]), int(r["K"]), int(r["N"])) for r in sel}, key=lambda s: (s[0] * s[1] * s[2], s))
            for p in dict.fromkeys(r["provider"] for r in sel):
                tf = {(int(r["M"]), int(r["K"]), int(r["N"])): float(r["tflops"]) for r in sel if r["provider"] == p}
                ax.plot(range(len(shapes)), [tf.get(s, math.nan) for s in shapes], marker="o", label=p)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{m}x{k}x{n}" for m, k, n in shapes], rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{mode}, {dtype}, act={act}", fontsize=10)
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{shape_set} (M x K x N): {mine[0]['device_name']}, torch {mine[0]['torch']}", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
        path = out / f"tflops_{shape_set}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
