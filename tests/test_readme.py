"""The README stays true: its Python tour runs, and CI runs the test command it shows."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in first_block.strip().splitlines()]
    assert len(commands) == 2
    assert commands[0].startswith("pip install -e . && qkov ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), "the README's test command must be what .ci/run runs"


def test_readme_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
