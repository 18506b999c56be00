"""The package without Triton, and the README's snippets."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_and_runs_without_triton():
    # None in sys.modules is how Python spells "not installed" to both `import triton`
    # (ImportError) and importlib.util.find_spec (None), which torch >= 2.14 asks on import.
    code = """
import sys
sys.modules["triton"] = None
import torch, torch_matgrad as mg
x, w = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
mg.linear(x, w, None, "gelu").sum().backward()
assert x.grad.shape == (5, 3) and sys.modules["triton"] is None
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def _readme_blocks():
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", readme, re.S)


@pytest.mark.parametrize("block", _readme_blocks(), ids=lambda b: b.splitlines()[0][:40])
def test_readme_python_runs_as_printed(block, tmp_path):
    # Every Python snippet runs as printed on the machine it says it runs on: in this
    # process, on a CUDA machine (first line "# on a CUDA machine"), or as the script
    # its first line names, with the environment and command printed there.
    first = block.splitlines()[0]
    if first.startswith("# on a CUDA machine"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("the snippet says it runs on a CUDA machine")
    script = re.match(r"# (\S+\.py): run as (.*?)  \(", first)
    if script is None:
        exec(compile(block, "README.md", "exec"), {})
        return
    name, command = script.groups()
    (tmp_path / name).write_text(block)
    *assignments, python, file = command.split()
    assert (python, file) == ("python", name), command
    env = {**os.environ, **dict(a.split("=", 1) for a in assignments), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The snippet's trailing comments show what it prints.
    for shown in re.findall(r"print\(.*\)\s+# (.*)", block):
        assert shown in done.stdout
