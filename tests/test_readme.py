"""Every command of README.md's Quick start, run as written, in order, in a fresh copy of the project:
what a newcomer pastes must run. Training commands are shortened by flags appended to them (argparse
takes the last of a repeated flag); installing is left to the test's own environment."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--max-steps", "3", "--eval-every", "0", "--eval-tokens", "1024", "--sample-tokens", "8", "--threads", "1"]

pytestmark = pytest.mark.slow


def quick_start_commands(readme):
    """The command lines of the bash blocks between '## Quick start' and the next '## ' heading."""
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                lines.append(command)
    return lines


def shortened(command):
    """The command with SHORT after every train.py call, or None for one this test does not run."""
    if command.startswith("pip install"):
        return None  # the test runs in the environment it was installed into
    parts = [part.strip() for part in command.split(";")]
    return "; ".join(f"{p} {' '.join(SHORT)}" if re.search(r"\btrain\.py\b", p) else p for p in parts)


def test_the_readme_commands_are_found():
    commands = quick_start_commands((ROOT / "README.md").read_text())
    assert any(c.startswith("python train.py --model gpt_llama") for c in commands)
    assert any(c.startswith("python sample.py out/paligemma --image") for c in commands)
    assert shortened("python train.py --model moe") == f"python train.py --model moe {' '.join(SHORT)}"


def test_every_quick_start_command_runs_as_written(tmp_path):
    work = tmp_path / "project"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv*", "out", "__pycache__", "*.egg-info",
                                                               ".pytest_cache", ".hypothesis", "examples"))
    env = {**os.environ, "LLMS_FROM_SCRATCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(work),
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = 0
    for command in quick_start_commands((ROOT / "README.md").read_text()):
        command = shortened(command)
        if command is None:
            continue
        run = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        output = run.stdout + run.stderr
        assert run.returncode == 0 and "Traceback" not in output, f"$ {command}\n{output[-3000:]}"
        ran += 1
    assert ran >= 10
