"""The README's commands and example stay true, and the documentation's links lead somewhere."""

import re
import subprocess
import sys

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme():
    return (REPO / "README.md").read_text()


def test_readme_starts_with_setup_then_train_then_test_commands():
    text = readme()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "pip install -e" in blocks[0]
    assert blocks[1].strip() == "distmaml train configs/sine_maml.yaml"
    command = 'python -m pytest -q -n 2 -m "not slow"'
    assert blocks[2].strip() == command
    ci = (REPO / ".ci/run").read_text()
    # CI runs the README's command, then the slow tests it leaves out.
    assert f"\n{command}\npython -m pytest -q -m slow\n" in ci


def test_library_example_runs_and_adaptation_helps():
    (example,) = re.findall(r"```python\n(.*?)```", readme(), re.S)
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    losses = [float(v) for v in out.stdout.strip().strip("[]").split(",")]
    assert len(losses) == 11 and losses[-1] < 0.5 * losses[0]


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", DOCS, ids=lambda path: path.name)
def test_every_relative_link_and_anchor_exists(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if fragment:
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", linked.read_text(), flags=re.S), re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name} links to {target}: no such heading"
