"""The layout's rules, read from the code's own imports: each top-level package imports only from the
packages below it, and the input contract stays light."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import (the README's "Where things live")
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "models": {"core", "data"},
    "engine": {"core"},
    "pretrain": {"core", "data", "models", "engine"},
    "finetune": {"core", "data", "models", "engine"},
    "benchmarks": {"core", "data", "models", "engine", "pretrain", "finetune", "benchmarks"},
}


def _imports(path: Path) -> set[str]:
    top = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top.add(node.module.split(".")[0])
    return top & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_from_below(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_reading_an_input_contract_loads_no_imaging_stack():
    code = ("import sys, models.input_spec, models.tasks; "
            "print(sorted(m for m in ('monai', 'scipy', 'skimage', 'pandas', 'nibabel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
