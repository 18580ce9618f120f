"""The admin console for real: a POC, the startup kit's interactive `fl_admin.sh` driven through a pty (as a person
types it): check_status, submit_job, list_jobs until the job ends, download_job, bye; then the per-site results
and a stop that leaves no process (checked by pid).

FEDOPAL_CONSOLE_TRANSCRIPT=<file> keeps what the console printed (the README's transcript comes from it)."""

import json
import os
import pty
import re
import select
import shutil
import sys
import time

import pytest

from fedopal.tools.job import export_job
from fedopal.tools.report import collect_site_records

from conftest import REPO, tiny_config

sys.path.insert(0, os.path.join(REPO, "poc_setup"))
import poc  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "> "


class Console:
    """fl_admin.sh in a pseudo-terminal: what is typed, and everything it prints, in order."""

    def __init__(self, kit: str, env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the console, as a person starts it
            os.chdir(kit)
            os.execvpe("bash", ["bash", os.path.join(kit, "startup", "fl_admin.sh")], env)
        self.transcript = []

    def read_until_prompt(self, timeout: float = 90.0) -> str:
        out, end = b"", time.time() + timeout
        while time.time() < end:
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    out += os.read(self.fd, 4096)
                except OSError:
                    break
                if out.replace(b"\r", b"").endswith(b"\n" + PROMPT.encode()) or out == PROMPT.encode():
                    break
        text = out.decode(errors="replace").replace("\r", "")
        self.transcript.append(text)
        assert text.endswith(PROMPT), f"no console prompt within {timeout} s; got: {text[-500:]}"
        return text[: -len(PROMPT)]

    def run(self, command: str, timeout: float = 90.0, keep: bool = True) -> str:
        """Type a command, return what it printed; keep=False leaves it out of the transcript (repeated polls)."""
        os.write(self.fd, (command + "\n").encode())
        kept = len(self.transcript)
        out = self.read_until_prompt(timeout).split("\n", 1)[-1]  # the terminal echoes the command first
        if not keep:
            del self.transcript[kept:]
        return out

    def close(self) -> int:
        os.write(self.fd, b"bye\n")
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_the_admin_console_submits_watches_and_downloads_a_job(small_federation, tmp_path):
    root, _ = small_federation
    cfg = tiny_config(root).model_copy(update={"name": "console_job"})
    cfg.model.head = None  # own design, a personal head: the POC sites let only the global adapter out
    job = export_job(cfg, str(tmp_path / "jobs"))
    deployment = poc.Poc.prepare(str(tmp_path / "ws"), str(tmp_path / "home"), ["site-1", "site-2"])
    seen: dict[int, float] = {}
    try:
        deployment.start()
        seen.update(poc.find_poc_processes(deployment.prod_dir))
        kit = deployment.admin_kit
        shutil.copytree(job, os.path.join(kit, "transfer", "console_job"))  # the console resolves jobs there
        console = Console(kit, poc.cli_env(deployment.workspace, deployment.state.home))
        console.read_until_prompt()  # POC kits log in without asking for a name

        status = console.run("check_status client")
        assert "site-1" in status and "site-2" in status
        job_id = re.search(r"Submitted job: (\S+)", console.run("submit_job console_job")).group(1)
        end, state = time.time() + 300, ""
        while time.time() < end:
            listing = console.run("list_jobs", keep=False)
            row = next(line for line in listing.splitlines() if job_id in line)
            state = row.split("|")[3].strip()
            seen.update(poc.find_poc_processes(deployment.prod_dir))
            if state.startswith("FINISHED"):
                console.run("list_jobs")  # the last poll, for the transcript
                break
            time.sleep(3)
        assert state == "FINISHED:COMPLETED", listing
        downloaded = console.run(f"download_job {job_id}")
        assert console.close() == 0
        result = os.path.join(kit, "transfer", job_id)
        assert os.path.isdir(result), downloaded

        # what the server received, from the downloaded result; what each site keeps, from its own folder
        with open(os.path.join(result, "workspace", "app_server", "fedopal_updates.jsonl")) as f:
            updates = [json.loads(line) for line in f]
        assert {u["site"] for u in updates if u["accepted"]} == {"site-1", "site-2"}
        for site in ("site-1", "site-2"):
            records = collect_site_records(os.path.join(deployment.prod_dir, site))
            assert [r["round"] for r in records[site]] == [1, 2]  # from 1, as every table
        if os.environ.get("FEDOPAL_CONSOLE_TRANSCRIPT"):
            with open(os.environ["FEDOPAL_CONSOLE_TRANSCRIPT"], "w") as f:
                f.write("".join(console.transcript).replace(job_id, "<job id>")
                        .replace(os.path.realpath(deployment.prod_dir), "<startup kits>")
                        .replace(str(deployment.prod_dir), "<startup kits>"))
    finally:
        deployment.stop()
        seen.update(poc.find_poc_processes(deployment.prod_dir))
        assert not poc.alive(seen), f"POC processes still running after stop: {poc.alive(seen)}"
