"""The package without Triton, and the snippets of the README and docs/."""

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


def test_supported_torch_range_is_the_one_ci_tests():
    # pyproject.toml states the range, .ci/run tests its two ends, the README says both.
    lower, upper = re.search(r'"torch>=(\d+\.\d+),<(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text()).groups()
    ci = (ROOT / ".ci" / "run").read_text()
    oldest, newest = (re.search(rf"^{name}=(\S+)$", ci, re.M).group(1) for name in ("OLDEST", "NEWEST"))
    minor = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    assert minor(oldest) == minor(lower) and minor(newest) == (minor(upper)[0], minor(upper)[1] - 1)
    assert f"PyTorch **{lower} to {newest.rsplit('.', 1)[0]}**" in (ROOT / "README.md").read_text()


def _doc_blocks():
    """``(page, block)`` for every Python snippet of the README and the pages under docs/."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [(page.relative_to(ROOT).as_posix(), block) for page in pages
            for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def _shows(shown: str, printed: str) -> bool:
    """Whether a print's trailing comment ``shown`` shows a line of ``printed``: the line
    itself, with "..." standing for any text, or the line then ": " and a gloss."""
    pattern = ".*".join(map(re.escape, shown.split("...")))
    return any(re.fullmatch(pattern, line) or shown.startswith(f"{line}: ") for line in printed.splitlines())


@pytest.mark.parametrize("page, block", _doc_blocks(), ids=lambda v: v.splitlines()[0][:40] if "\n" in v else v)
def test_doc_python_runs_as_printed(page, block, tmp_path, capsys):
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
        capsys.readouterr()
        exec(compile(block, page, "exec"), {})
        printed = capsys.readouterr().out
    else:
        name, command = script.groups()
        (tmp_path / name).write_text(block)
        *assignments, python, file = command.split()
        assert (python, file) == ("python", name), command
        env = {**os.environ, **dict(a.split("=", 1) for a in assignments), "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, name], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        printed = done.stdout
    # The snippet's trailing comments show what it prints.
    for shown in re.findall(r"print\(.*\)\s+# (.*)", block):
        assert _shows(shown, printed), f"{page}: prints no line shown as {shown!r}:\n{printed}"


def _package_imports():
    """``{module: modules of the package it imports}`` for every module under
    ``torch_matgrad/`` (and the kernels), the imports inside functions included."""
    import ast

    roots = {"torch_matgrad": ROOT / "torch_matgrad", "torch_matgrad.triton_kernels": ROOT / "triton_kernels"}
    files = {}
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if package == "torch_matgrad" and rel[0] == "triton_kernels":
                continue
            name = ".".join((package, *rel)).removesuffix(".__init__")
            files[name] = path
    graph = {}
    for name, path in files.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(parts + ([node.module] if node.module else []))
                if not node.level:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in files and t != name}
        graph[name] = found
    return graph


def test_no_two_modules_import_each_other():
    # A package's __init__ re-exporting its modules is the one import that points up.
    graph = _package_imports()
    assert "torch_matgrad.surgery.layers" in graph and "torch_matgrad.surgery.common" in graph["torch_matgrad.surgery.layers"]
    edges = {(a, b) for a, deps in graph.items() for b in deps if not a.startswith(b + ".")}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(b for a, b in edges if a == node):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _requirements(group: str):
    """``{name: requirement}`` of pyproject.toml's dependencies (``group`` "") or of an extra."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    requirement = pytest.importorskip("packaging.requirements").Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if not group else project["optional-dependencies"][group]
    return {r.name: r for r in map(requirement, listed)}


def test_triton_is_an_extra_that_the_tests_install():
    # A CPU user's `pip install -e .` must not download Triton (~1 GB installed); the
    # kernels' tests need it for the interpreter, and PyPI's CUDA torch brings its own.
    assert "triton" not in _requirements("")
    assert "triton" in _requirements("triton")
    test = _requirements("test")
    assert "triton" in test or "triton" in test["torch-matgrad"].extras


def test_ci_installs_as_the_readme_says():
    # .ci/run installs a CPU user's torch, checked to be a CPU build, and the package from
    # this checkout without extras, as the README's CPU section does (from PyTorch's CPU index).
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert re.search(r"# CPU only:.*\npython -m pip install torch --index-url \S+/cpu\npython -m pip install -e \.\n",
                     readme)
    assert re.search(r'fresh_venv "\$CPU_BUILD"\n.*torch\.version\.cuda is None.*\npython -m pip install -q \.\n', ci)
    assert "`.[triton]`" in readme


def test_readme_states_the_suite_size(request):
    # "about N tests" holds within 15% of what this session collected. Deselected tests
    # count (-k keeps them collected); a session that collected only some files skips.
    stated = int(re.search(r"The suite \(about ([\d,]+) tests", (ROOT / "README.md").read_text()).group(1)
                 .replace(",", ""))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    items = [*request.session.items, *(reporter.stats.get("deselected", []) if reporter else [])]
    if {item.path.name for item in items} != {p.name for p in (ROOT / "tests").glob("test_*.py")}:
        pytest.skip("this session did not collect every test file")
    assert abs(len(items) - stated) <= 0.15 * stated, f"collected {len(items)} tests; the README says about {stated}"


def test_readme_results_state_one_direction():
    # Every ratio of the Results table is a time or memory relative to the baseline.
    results = (ROOT / "README.md").read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    assert "lower is better" in results and "speed" not in results.lower()
