"""The README's commands and code, the quickstart and CI agree with each other and work."""
import pathlib
import re
import runpy

import torch

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = ".venv/bin/python -m pytest -q"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_readme_starts_with_the_two_commands():
    install, tests = code_blocks("bash")[:2]
    assert README.index(install) < 400  # the first lines of the README
    assert install.startswith("python3 -m venv .venv && ")
    assert ".venv/bin/pip install torch==2.13.0 triton==3.9.0 && " in install
    assert ".venv/bin/pip install -e '.[dev,viz]' && " in install
    assert ".venv/bin/flexdsl check " in install
    assert install.rstrip().endswith(".venv/bin/python examples/quickstart.py")
    assert install.count("\n") == 1  # one line
    assert tests.strip() == TEST_COMMAND


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "set -euo pipefail" in lines
    assert TEST_COMMAND in lines
    install_torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    install_package = next(i for i, line in enumerate(lines) if "-e '.[dev,viz]'" in line)
    assert install_torch < install_package < lines.index(TEST_COMMAND)
    assert not any("|| true" in line or "pytest" in line and "|" in line for line in lines)


def test_quickstart_passes(capsys):
    quickstart = runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="quickstart")
    assert quickstart["main"]() == 0
    out = capsys.readouterr().out
    error = float(re.search(r"max abs error against the float64 reference: (\S+)", out)[1])
    assert error <= quickstart["TOLERANCE"]
    assert "  tensor    doc: int, rank 1, indexed by [q] and by [kv]" in out
    assert out.rstrip().endswith("OK")


def test_readme_python_example_runs():
    scope = {}
    exec(code_blocks("python")[0], scope)
    out, lse, want = scope["out"], scope["lse"], scope["want"]
    assert out.shape == (2, 8, 700, 64) and lse.shape == (2, 8, 700)
    assert (out.double() - want).abs().max().item() < 1e-4
    assert torch.isfinite(lse).all()
