"""FedOPAL on a real FLARE deployment, on one machine (POC mode), and the site policy every hospital installs.

    python poc_setup/poc.py prepare [--sites site-1 site-2 ... | -n N] [--port P] [--workspace DIR] [--home DIR] [--he]
    python poc_setup/poc.py start                       # server + sites, FEDOPAL_HOME = this repository
    python poc_setup/poc.py submit jobs/fedopal_demo    # through the FLARE API; prints the job id
    python poc_setup/poc.py wait [JOB_ID]
    python poc_setup/poc.py download [JOB_ID] [--out DIR]
    python poc_setup/poc.py report [JOB_ID]             # per-site results table (from the sites' own logs)
    python poc_setup/poc.py stop                        # returns when every POC process is gone
    python poc_setup/poc.py clean
    python poc_setup/poc.py run jobs/fedopal_demo       # prepare .. stop in one go (`make poc`); always stops

A hospital installs its own policy in its kit with `fedopal site-policy KIT --policy FILE [--deny-byoc]`; `prepare`
does it for every POC site (the shipped policy `global-only`) and the server (its allow-list for jobs without code).

The POC is the consortium of project.yml rehearsed locally: same admins and roles, the server renamed
`server` on localhost, the given site names, and a free port. Everything lives under --workspace (the
POC workspace, NVFLARE_POC_WORKSPACE) and --home (the scratch HOME FLARE's CLI writes ~/.nvflare into),
both under workspace/poc/ by default; the other commands find the rest in <workspace>/fedopal_poc.json.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import psutil
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP_DIR = os.path.join(REPO, "poc_setup")
CONSORTIUM_PROJECT = os.path.join(SETUP_DIR, "project.yml")
SITE_PRIVACY = "global-only"  # the site policies that ship with the runtime (fedopal/policy/sites/): only the global
SITE_PRIVACY_DP = "global-only-dp"  # adapter leaves; the same, clipped and noised by the site
DEFAULT_ROOT = os.path.join(REPO, "workspace", "poc")
STATE_FILE = "fedopal_poc.json"
POC_SERVER_NAME = "server"
STOP_GRACE_S = 60.0


class PocError(RuntimeError):
    """A POC step failed; the message is one line naming what and the fix."""


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice for port 0 on the loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port_free(port: int) -> None:
    """The server binds `port` on every interface: refuse now, in one line, rather than a CONNECTION_FAILED from
    `poc start` two minutes later (with the bind error only in the server's log)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as err:
            raise PocError(f"port {port} is already in use ({err.strerror}): the FLARE server could not listen "
                           "there. Fix: stop what holds it, or prepare again with another --port (or none: a free "
                           "one is picked).") from None


HE_BUILDER = {"path": "nvflare.lighter.impl.he.HEBuilder", "args": {}}  # NVFlare's defaults: CKKS, N 8192, [60, 40, 40]


def poc_project(consortium: dict, sites: list[str], port: int, he: bool = False) -> dict:
    """The consortium's project, on one machine: server `server` on `port`, the given sites, the same admins.
    he: also NVFlare's HEBuilder (TenSEAL CKKS contexts in every kit, for federation.encryption he), placed before
    the last builder (the signature builder) as `nvflare poc prepare --he` does, so the contexts are signed too."""
    participants = consortium.get("participants") or []
    hospitals = [p for p in participants if p.get("type") == "client"]
    admins = [p for p in participants if p.get("type") == "admin"]
    servers = [p for p in participants if p.get("type") == "server"]
    if len(servers) != 1 or not hospitals or not any(a.get("role") == "project_admin" for a in admins):
        raise PocError(f"{CONSORTIUM_PROJECT}: needs one server, at least one client and a project_admin admin. "
                       f"Fix: restore the participants list.")
    if len(set(sites)) != len(sites) or not sites:
        raise PocError(f"--sites {' '.join(sites)}: site names must be given and distinct.")
    server = {**servers[0], "name": POC_SERVER_NAME, "fed_learn_port": port, "admin_port": port}
    # Site i joins the org of the i-th hospital, so org_admin and lead rights behave as in the consortium.
    clients = [{"name": s, "type": "client", "org": hospitals[i % len(hospitals)]["org"]} for i, s in enumerate(sites)]
    project = {**consortium, "participants": [server, *clients, *admins]}
    builders = list(consortium.get("builders") or [])
    if he and HE_BUILDER["path"] not in [b.get("path") for b in builders]:
        builders.insert(max(len(builders) - 1, 0), dict(HE_BUILDER))
        project["builders"] = builders  # without he the project keeps its own (or FLARE's default) builders
    return project


def install_site_policy(kit_dir: str, policy: str | None = SITE_PRIVACY, deny_byoc: bool = False) -> None:
    """A startup kit's own rules (fedopal.policy.install): its privacy.json (a site's; None for the server's kit),
    the allow-list of classes a job without code may name, and optionally no bring-your-own-code at all."""
    from fedopal.policy.install import PolicyInstallError
    from fedopal.policy.install import install_site_policy as install

    try:
        install(kit_dir, policy, deny_byoc)
    except PolicyInstallError as err:
        raise PocError(str(err)) from None


def find_poc_processes(prod_dir: str) -> dict[int, float]:
    """pid -> start time of every process of this POC: the start.sh daemons, FLARE's server and site processes,
    their job processes (all name a folder of prod_dir on their command line) and their children (sleep)."""
    marker = prod_dir.rstrip(os.sep) + os.sep
    found: dict[int, float] = {}
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        if proc.pid == os.getpid() or marker not in " ".join(proc.info["cmdline"] or ()):
            continue
        found[proc.pid] = proc.info["create_time"]
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found[child.pid] = child.create_time()
    return found


def alive(pids: dict[int, float]) -> list[int]:
    """The recorded processes still running (same pid *and* start time; zombies count as gone)."""
    running = []
    for pid, started in pids.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
    return running


@dataclass
class PocState:
    """What `prepare` decided, for the later commands (kept in <workspace>/fedopal_poc.json)."""

    workspace: str
    home: str
    port: int
    project: str
    admin: str
    sites: list[str]
    pids: dict[str, float] = field(default_factory=dict)  # every POC process seen, for `stop` to wait on
    last_job_id: str | None = None


class Poc:
    def __init__(self, state: PocState):
        self.state = state
        self.workspace = state.workspace

    @classmethod
    def load(cls, workspace: str) -> "Poc":
        path = os.path.join(os.path.abspath(workspace), STATE_FILE)
        if not os.path.isfile(path):
            raise PocError(f"{path} not found: no POC prepared there. "
                           f"Fix: run `poc.py prepare --workspace {workspace}` first.")
        with open(path) as f:
            return cls(PocState(**json.load(f)))

    # -- where things are ---------------------------------------------------------------------
    @property
    def prod_dir(self) -> str:
        return os.path.join(self.workspace, self.state.project, "prod_00")

    @property
    def admin_kit(self) -> str:
        return os.path.join(self.prod_dir, self.state.admin)

    def server_job_dir(self, job_id: str) -> str:
        return os.path.join(self.prod_dir, POC_SERVER_NAME, job_id)

    def save(self) -> None:
        with open(os.path.join(self.workspace, STATE_FILE), "w") as f:
            json.dump(asdict(self.state), f, indent=1)

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def prepare(cls, workspace: str, home: str, sites: list[str], port: int | None = None,
                consortium: str = CONSORTIUM_PROJECT, he: bool = False) -> "Poc":
        workspace, home = os.path.abspath(workspace), os.path.abspath(home)
        if os.path.isfile(os.path.join(workspace, STATE_FILE)):
            cls.load(workspace).stop()  # FLARE's prepare --force would delete the workspace of a running POC
        port = port or free_port()
        check_port_free(port)
        with open(consortium) as f:
            project = poc_project(yaml.safe_load(f), sites, port, he)
        admin = next(a["name"] for a in project["participants"] if a.get("role") == "project_admin")
        os.makedirs(home, exist_ok=True)
        # The project file must live outside the workspace, which prepare deletes first.
        with tempfile.TemporaryDirectory() as tmp:
            project_file = os.path.join(tmp, "project.yml")
            with open(project_file, "w") as f:
                yaml.safe_dump(project, f, sort_keys=False)
            _nvflare(["poc", "prepare", "-i", project_file, "--force"], cli_env(workspace, home), "prepare")
        poc = cls(PocState(workspace=workspace, home=home, port=port, project=project["name"], admin=admin,
                           sites=list(sites)))
        poc.save()
        for site in sites:
            install_site_policy(os.path.join(poc.prod_dir, site))
        install_site_policy(os.path.join(poc.prod_dir, POC_SERVER_NAME), None)  # its allow-list for no-code jobs
        print(f"poc: prepared {len(sites)} sites ({', '.join(sites)}) on port {port}, workspace {workspace}, "
              f"HOME {home}; site policy in <site>/local/privacy.json", flush=True)
        return poc

    def start(self, fedopal_home: str = REPO, timeout_s: int = 120, gpus: list[int] | None = None) -> None:
        """Server and sites. Relative data.root resolves against FEDOPAL_HOME in each site process.
        gpus: GPU ids handed to `nvflare poc start -gpu`: each site process sees its share (FLARE deals them out in
        turn, site-1 the first) as CUDA_VISIBLE_DEVICES, so train.device auto picks it as cuda:0."""
        check_port_free(self.state.port)  # taken since prepare?
        env = cli_env(self.workspace, self.state.home)
        env["FEDOPAL_HOME"] = os.path.abspath(fedopal_home)
        try:
            _nvflare(start_args(timeout_s, gpus), env, "start")
        finally:
            self.record_processes()  # even a half-started POC must be stoppable by pid
        print(f"poc: server and {len(self.state.sites)} sites up on localhost:{self.state.port} "
              f"(logs: {self.prod_dir}/<participant>/log.txt)", flush=True)

    def record_processes(self) -> None:
        for pid, started in find_poc_processes(self.prod_dir).items():
            self.state.pids[str(pid)] = started
        self.save()

    @property
    def admin(self):
        """The FLARE API as the project admin (headless: the admin's startup kit, no console)."""
        from fedopal.tools.flare_admin import FlareAdmin

        return FlareAdmin(self.state.admin, self.admin_kit)

    def session(self):
        return self.admin.session()

    def submit(self, job_folder: str) -> str:
        job_folder = os.path.abspath(job_folder)
        if not os.path.isfile(os.path.join(job_folder, "meta.json")):
            raise PocError(f"{job_folder}: no meta.json, so this is not a job folder. "
                           f"Fix: export one (make export) and give jobs/<name>.")
        job_id = self.admin.submit(job_folder)  # a copy is submitted: jobs/ stays as exported
        self.state.last_job_id = job_id
        self.save()
        return job_id

    def wait(self, job_id: str, timeout_s: float = 3600.0) -> str:
        """Polls until the job ends; returns FLARE's final status (FINISHED:COMPLETED when all went well)."""
        def poll(*_args, **_kwargs) -> bool:
            self.record_processes()  # job processes come and go: stop must know them too
            return True

        timed_out, meta = self.admin.wait(job_id, timeout_s, cb=poll)
        if timed_out:
            raise PocError(f"job {job_id} did not finish within {timeout_s:.0f} s. "
                           f"Fix: see {self.server_job_dir(job_id)}/log.txt, or wait longer (--timeout).")
        return meta["status"]

    def run_time_s(self, job_id: str) -> float:
        """How long the job ran, as FLARE's job meta says ("H:MM:SS.ffffff")."""
        with self.session() as sess:
            duration = sess.get_job_meta(job_id).get("duration") or "0:0:0"
        hours, minutes, seconds = duration.split(":")
        return 3600 * int(hours) + 60 * int(minutes) + float(seconds)

    def download(self, job_id: str, out_dir: str) -> str:
        """The job's result as the server keeps it: <out_dir>/<job_id>/workspace/app_server/... and the job."""
        return self.admin.download(job_id, out_dir)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """FLARE's stop, then wait until every recorded process is really gone; stragglers get SIGTERM, then SIGKILL."""
        pids = {int(p): t for p, t in self.state.pids.items()}
        pids.update(find_poc_processes(self.prod_dir))
        if not alive(pids):
            print("poc: not running", flush=True)
            return
        result = _nvflare(["poc", "stop"], cli_env(self.workspace, self.state.home), "stop", check=False,
                          timeout_s=grace_s)
        if result.returncode != 0:
            # The server did not answer: each start.sh daemon also stops when it finds shutdown.fl.
            for service in (POC_SERVER_NAME, *self.state.sites):
                with contextlib.suppress(OSError):
                    open(os.path.join(self.prod_dir, service, "shutdown.fl"), "a").close()
        remaining = _wait_until_gone(pids, self.prod_dir, grace_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not remaining:
                break
            print(f"poc: {len(remaining)} process(es) still running after the stop, sending {sig.name}: {remaining}",
                  flush=True)
            for pid in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            remaining = _wait_until_gone(pids, self.prod_dir, 10.0)
        if remaining:
            raise PocError(f"processes {remaining} of {self.prod_dir} would not stop. Fix: kill them by pid.")
        self.state.pids = {}
        self.save()
        print(f"poc: stopped; none of the {len(pids)} processes seen is left", flush=True)

    def clean(self) -> None:
        """Stop, then delete the POC workspace and the scratch HOME (kept only if it is the real HOME)."""
        self.stop()
        shutil.rmtree(self.workspace)
        if os.path.realpath(self.state.home) != os.path.realpath(os.path.expanduser("~")):
            shutil.rmtree(self.state.home, ignore_errors=True)
        print(f"poc: removed {self.workspace} and {self.state.home}", flush=True)

    # -- results ------------------------------------------------------------------------------
    def report(self, job_folder: str, wall_s: float) -> str:
        """Per-site table from the sites' metrics logs (in POC every site's folder is on this machine; they
        accumulate over jobs, so run one job per prepared POC, as `run` does)."""
        from fedopal.tools.report import summarize

        return summarize(self.prod_dir, job_config(job_folder), wall_s)["markdown"]


def job_config(job_folder: str):
    """The FedOPAL config a job folder carries (its site executor's job_config)."""
    from fedopal.tools.job import JobBuildError, config_of_job

    try:
        return config_of_job(job_folder)
    except JobBuildError as err:
        raise PocError(str(err)) from None


def _wait_until_gone(pids: dict[int, float], prod_dir: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        pids.update(find_poc_processes(prod_dir))  # a child started meanwhile is waited for too
        remaining = alive(pids)
        if not remaining or time.monotonic() > deadline:
            return remaining
        time.sleep(0.5)


def cli_env(workspace: str, home: str) -> dict:
    """FLARE's CLI and services: scratch HOME and POC workspace, this venv's python3 first on PATH (start.sh
    runs `python3`), and no PYTHONPATH: sites import the installed runtime and what a job ships (first)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HOME=home, NVFLARE_POC_WORKSPACE=workspace,
               PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]))
    return env


def _nvflare(args: list[str], env: dict, step: str, check: bool = True, timeout_s: float = 300.0):
    cmd = [sys.executable, "-m", "nvflare.cli", *args]
    try:
        result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PocError(f"`nvflare {' '.join(args)}` did not return within {timeout_s:.0f} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise PocError(f"{step} failed: `nvflare {' '.join(args)}` exited {result.returncode}: "
                       f"{detail[-1] if detail else 'no output'}")
    return result


def start_args(timeout_s: int, gpus: list[int] | None) -> list[str]:
    """The `nvflare poc start` command line; FLARE checks the ids against nvidia-smi's and refuses unknown ones."""
    return ["poc", "start", "--timeout", str(timeout_s)] + (["-gpu", *map(str, gpus)] if gpus else [])


# -- CLI -------------------------------------------------------------------------------------------
def run(job_folder: str, workspace: str, home: str, sites: list[str], out_dir: str, timeout_s: float,
        gpus: list[int] | None = None, he: bool = False) -> int:
    """prepare -> start -> submit -> wait -> download -> report -> stop, timing each stage; always stops."""
    from fedopal.tools.job import ProgressWatcher

    times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str):
        print(f"poc: {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            yield
        finally:
            times[name] = time.monotonic() - t0

    poc = None
    try:
        with stage("prepare"):
            poc = Poc.prepare(workspace, home, sites, he=he)
        with stage("start"):
            poc.start(gpus=gpus)
        with stage("submit"):
            job_id = poc.submit(job_folder)
            print(f"poc: submitted {job_folder} as job {job_id}", flush=True)
        cfg = job_config(job_folder)
        watcher = ProgressWatcher(poc.prod_dir, cfg.train.num_rounds)
        watcher.start()
        try:
            with stage("wait"):
                status = poc.wait(job_id, timeout_s)
        finally:
            watcher.stop()
        print(f"poc: job {job_id} ({cfg.name}) ended with {status}", flush=True)
        if status != "FINISHED:COMPLETED":
            raise PocError(f"job {job_id} ended with {status}. Fix: see {poc.prod_dir}/<site>/{job_id}/log.txt "
                           f"and {poc.server_job_dir(job_id)}/log.txt (the POC workspace is kept).")
        with stage("download"):
            result = poc.download(job_id, out_dir)
        print(f"poc: job result in {result} (server side: workspace/app_server/FL_global_model.pt, "
              f"fedopal_updates.jsonl)", flush=True)
        table = poc.report(job_folder, times["wait"])
        print(table)
        with open(os.path.join(out_dir, "report.md"), "w") as f:  # what `make docs` commits
            f.write(table + "\n")
        print(f"poc: table in {os.path.join(out_dir, 'report.md')}; personal state of each site in "
              f"{poc.prod_dir}/<site>/fedopal_site_state/<site>/")
    finally:
        if poc is None and os.path.isfile(os.path.join(workspace, STATE_FILE)):
            poc = Poc.load(workspace)  # prepare failed half-way: whatever it started still gets stopped
        with stage("stop"):
            if poc is not None:
                poc.stop()
        print("poc: stage wall times: " + " | ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)
    return 0


def main(argv=None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", default=os.path.join(DEFAULT_ROOT, "nvflare_poc"),
                        help="POC workspace (NVFLARE_POC_WORKSPACE); default workspace/poc/nvflare_poc")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def site_args(sp):
        group = sp.add_mutually_exclusive_group()
        group.add_argument("--sites", nargs="+", help="site names (default site-1..site-N, as the demo data)")
        group.add_argument("-n", "--num-sites", type=int, default=4, help="number of sites (default 4)")
        sp.add_argument("--home", default=os.path.join(DEFAULT_ROOT, "home"),
                        help="scratch HOME for FLARE's CLI (~/.nvflare); default workspace/poc/home")

    sp = sub.add_parser("prepare", parents=[common], help="provision the POC: sites, port, site privacy policy")
    site_args(sp)
    sp.add_argument("--port", type=int, help="server port (default: a free one)")
    sp.add_argument("--he", action="store_true", help="also TenSEAL contexts in every kit (NVFlare's HEBuilder), "
                                                      "for jobs with federation.encryption he")
    gpu_help = "GPU ids for the sites (nvflare poc start -gpu): dealt out in turn, site-1 the first"
    sp = sub.add_parser("start", parents=[common], help="start server and sites")
    sp.add_argument("--fedopal-home", default=REPO, help="FEDOPAL_HOME of the sites: relative data.root resolves "
                                                         "against it")
    sp.add_argument("--gpus", type=int, nargs="+", help=gpu_help)
    sp = sub.add_parser("submit", parents=[common], help="submit a job folder with the FLARE API; prints its id")
    sp.add_argument("job_folder")
    for name, what in (("wait", "wait until the job ends"), ("download", "download the job's result")):
        sp = sub.add_parser(name, parents=[common], help=what)
        sp.add_argument("job_id", nargs="?", help="default: the last job submitted")
        sp.add_argument("--timeout", type=float, default=3600.0)
        sp.add_argument("--out", default=os.path.join(DEFAULT_ROOT, "results"), help="download folder")
    sp = sub.add_parser("report", parents=[common], help="per-site results table of a job (from the sites' logs)")
    sp.add_argument("job_folder", help="the job folder that was submitted (for its config)")
    sp.add_argument("--job-id", help="for its run time; default: the last job submitted")
    sub.add_parser("stop", parents=[common], help="stop, and return once every POC process is gone")
    sub.add_parser("clean", parents=[common], help="stop, then delete the POC workspace and scratch HOME")
    sp = sub.add_parser("run", parents=[common], help="prepare, start, submit, wait, download, report, stop")
    sp.add_argument("job_folder")
    site_args(sp)
    sp.add_argument("--timeout", type=float, default=3600.0)
    sp.add_argument("--out", default=os.path.join(DEFAULT_ROOT, "results"), help="download folder")
    sp.add_argument("--gpus", type=int, nargs="+", help=gpu_help)
    sp.add_argument("--he", action="store_true", help="provision TenSEAL contexts (HEBuilder) for an HE job")
    args = p.parse_args(argv)

    try:
        sites = None
        if args.command in ("prepare", "run"):
            sites = args.sites or [f"site-{i + 1}" for i in range(args.num_sites)]
        if args.command == "prepare":
            Poc.prepare(args.workspace, args.home, sites, args.port, he=args.he)
        elif args.command == "run":
            return run(os.path.abspath(args.job_folder), args.workspace, args.home, sites, args.out, args.timeout,
                       args.gpus, he=args.he)
        else:
            poc = Poc.load(args.workspace)
            job_id = getattr(args, "job_id", None) or poc.state.last_job_id
            if args.command in ("wait", "download") and not job_id:
                raise PocError("no job id given and none submitted yet. Fix: `poc.py submit <job folder>` first.")
            if args.command == "start":
                poc.start(args.fedopal_home, gpus=args.gpus)
            elif args.command == "submit":
                print(poc.submit(args.job_folder))
            elif args.command == "wait":
                status = poc.wait(job_id, args.timeout)
                print(status)
                return 0 if status == "FINISHED:COMPLETED" else 1
            elif args.command == "download":
                print(poc.download(job_id, args.out))
            elif args.command == "report":
                run_time = poc.run_time_s(job_id) if job_id else float("nan")
                print(poc.report(os.path.abspath(args.job_folder), run_time))
            elif args.command == "stop":
                poc.stop()
            elif args.command == "clean":
                poc.clean()
    except PocError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
