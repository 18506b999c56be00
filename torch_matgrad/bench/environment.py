"""What every row records: device, versions, commit, date; and where a run writes."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict

import torch

from ..dispatch import slug


def environment(device: str) -> Dict[str, str]:
    """The columns every row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_model()}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    """``$TORCH_MATGRAD_COMMIT`` (for a tree copied without ``.git``), else the commit of
    the source tree this module was loaded from (``-dirty`` with uncommitted changes to
    tracked files), else "unknown"."""
    if os.environ.get("TORCH_MATGRAD_COMMIT"):
        return os.environ["TORCH_MATGRAD_COMMIT"]

    def git(*args):
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if changes else "")) if head else "unknown"


#: Where a run without ``--out`` writes (``.gitignore`` lists it): a run never rewrites
#: the committed results in ``benchmarks/results/`` unless ``--out`` names them.
DEFAULT_OUT = Path("benchmarks", "out")


def default_out(device: str, env: Dict[str, str]) -> Path:
    """A new folder under ``DEFAULT_OUT`` named by the device and the run's UTC time."""
    name = "cpu" if device == "cpu" else slug(env["device_name"])
    stamp = env["date"].replace(":", "").replace("-", "")
    out, n = DEFAULT_OUT / f"{name}-{stamp}", 1
    while out.exists():
        n += 1
        out = DEFAULT_OUT / f"{name}-{stamp}-{n}"
    return out
