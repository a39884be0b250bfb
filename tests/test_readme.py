"""The README's commands and example stay true."""

import re
import subprocess
import sys

from conftest import REPO


def readme():
    return (REPO / "README.md").read_text()


def test_readme_starts_with_setup_then_train_then_test_commands():
    text = readme()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "pip install -e" in blocks[0]
    assert blocks[1].strip() == "distmaml train configs/sine_maml.yaml"
    assert blocks[2].strip() == "python -m pytest -q"
    assert "python -m pytest -q" in (REPO / ".ci/run").read_text()


def test_library_example_runs_and_adaptation_helps():
    (example,) = re.findall(r"```python\n(.*?)```", readme(), re.S)
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    losses = [float(v) for v in out.stdout.strip().strip("[]").split(",")]
    assert len(losses) == 11 and losses[-1] < 0.5 * losses[0]
