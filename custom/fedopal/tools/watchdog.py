"""The simulator's site watchdog: a site process that dies where the job needs it ends the run in one line.

FLARE's simulator runs each site in its own `simulator_worker` process. When one dies (killed, out of memory) and
the job needs it (fewer live sites than `federation.min_clients`), the simulator logs "Failed to create connection
to the child process" once and then waits forever: the server never gets the results it waits for. NVFlare 2.9 has
no timeout for this (its task timeouts are per job, unset by FedAvg), so this thread watches the site processes and,
once too many sites have had no process for `grace_s`, stops the simulator's process tree; `simulate` then raises
SiteLostError.
With `min_clients` below the number of sites a dead site is left alone: the rounds go on with the others
(tests/test_site_fault.py). A normal end ends every site process too: the simulator returns within seconds then,
well inside `grace_s`.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

WORKER_MODULE = "nvflare.private.fed.app.simulator.simulator_worker"
GRACE_S = 90.0  # FLARE's own connection timeout to a site process is 60 s; a normal end takes a few seconds


class SiteLostError(RuntimeError):
    """A site process died and the job could not finish without it; the message is one line naming the site."""


def _site_of(proc: psutil.Process) -> str | None:
    """The site a simulator_worker process runs (its `--client` argument); None for any other process."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return None
    if WORKER_MODULE not in cmd or "--client" not in cmd[:-1]:
        return None
    return cmd[cmd.index("--client") + 1]


class SiteWatchdog(threading.Thread):
    """Watches this process's simulator_worker descendants of one run.

    sites: the job's site names; min_clients: federation.min_clients; job_ws: the job's workspace (for the log
    path in the message); grace_s: seconds a site may have no process before it counts as lost.
    After the run, `failure` is None or the one-line message."""

    def __init__(self, job_ws: str, sites: list[str], min_clients: int, grace_s: float = GRACE_S,
                 interval: float = 1.0):
        super().__init__(daemon=True)
        self.job_ws, self.sites, self.min_clients = job_ws, list(sites), min_clients
        self.grace_s, self.interval = grace_s, interval
        self.failure: str | None = None
        self._seen: dict[str, float] = {}  # site -> when a process of it was last seen alive
        self._runners: dict[int, psutil.Process] = {}  # the simulator's own process(es) above the workers
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.interval) and self.failure is None:
            self.poll()

    def stop(self):
        self._stop_event.set()
        self.join(timeout=5)

    def poll(self, now: float | None = None) -> None:
        """One look at the site processes. A site counts as lost once no process of it has been seen for grace_s
        seconds, counted from when the first site process appeared (a site that dies before its first sighting is
        caught too); the run is stopped once more sites are lost than the job can do without."""
        now = time.time() if now is None else now
        try:
            descendants = psutil.Process(os.getpid()).children(recursive=True)
        except psutil.Error:
            return
        for proc in descendants:
            site = _site_of(proc)
            if site in self.sites and _alive(proc):
                if not self._seen:  # the simulator started its sites: every site is expected from now on
                    self._seen = dict.fromkeys(self.sites, now)
                self._seen[site] = now
                runner = _runner(proc)
                if runner is not None:
                    self._runners[runner.pid] = runner
        lost = sorted((t, site) for site, t in self._seen.items() if now - t >= self.grace_s)
        if len(lost) <= len(self.sites) - self.min_clients:
            return
        _, first = lost[0]
        log = os.path.join(self.job_ws, first, "log.txt")
        where = (f"log: {log}" if os.path.isfile(log) else
                 f"it wrote no log; the simulator's: {os.path.join(self.job_ws, 'server', 'log.txt')}")
        self.failure = (
            f"{first}: its site process ended during the job (killed, or out of memory: the system log says which) "
            f"and the job needs {self.min_clients} of {len(self.sites)} sites (federation.min_clients), so FLARE's "
            f"simulator would have waited forever; it was stopped {self.grace_s:.0f} s later "
            f"({where}). Fix: give that site the memory it needs "
            f"(train.batch_size, data.image_size), or set federation.min_clients below {len(self.sites)} so the "
            "rounds go on without it; --resume continues from the last finished round.")
        self._stop_simulator()

    def _stop_simulator(self) -> None:
        """Ends the simulator's process (NVFlare starts it as a child of this one, its own session) and everything
        under it: the main thread's wait for it returns -9 and NVFlare's SimEnv raises RuntimeError."""
        victims = [p for r in self._runners.values() for p in _tree(r)]
        for proc in victims:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=10)


def _runner(worker: psutil.Process) -> psutil.Process | None:
    """The simulator's process above a site worker: its ancestor that is a child of this process (None when the
    worker is not under this process)."""
    me = os.getpid()
    try:
        return next((p for p in worker.parents() if p.ppid() == me), None)
    except psutil.Error:
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True) + [proc]
    except psutil.Error:
        return [proc]
