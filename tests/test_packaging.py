"""The package without Triton, and the README's example."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_and_runs_without_triton():
    # A meta-path blocker makes `import triton` fail as on a machine without it.
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
sys.meta_path.insert(0, Block())
import torch, torch_matgrad as mg
x, w = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
mg.linear(x, w, None, "gelu").sum().backward()
assert x.grad.shape == (5, 3) and "triton" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("section", ["## Use it", "## The notes, executable"])
def test_readme_example_runs(section):
    readme = (ROOT / "README.md").read_text()
    block = re.search(re.escape(section) + r".*?```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
