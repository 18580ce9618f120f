"""The README's commands run as written: from the repository after `make venv`, with no PYTHONPATH and a fresh HOME.

The list comes from the README itself (fedopal.tools.docs.readme_commands); a command that cannot run on this machine
must be named, with the reason, in fedopal.tools.docs.NOT_RUN_HERE, so a new command is never silently skipped."""

import os
import subprocess

import pytest

from fedopal.tools.docs import NOT_RUN_HERE, not_run_reason, readme_commands

from conftest import REPO

COMMANDS = readme_commands(open(os.path.join(REPO, "README.md")).read())


def test_every_command_is_run_or_says_why_not():
    assert len(COMMANDS) >= 10
    used = {start for start in NOT_RUN_HERE if any(c.startswith(start) for c in COMMANDS)}
    assert used == set(NOT_RUN_HERE), f"stale entries in NOT_RUN_HERE: {set(NOT_RUN_HERE) - used}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if not_run_reason(c) is None])
def test_the_readme_command_runs_as_written(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(tmp_path), PATH=os.pathsep.join([os.path.join(REPO, ".venv", "bin"), env.get("PATH", "")]))
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
    assert "Traceback" not in proc.stderr
