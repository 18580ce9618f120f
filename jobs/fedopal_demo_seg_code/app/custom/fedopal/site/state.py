"""What a site keeps on its own disk: the personal state (atomic, every round) and its metrics log.

The folder is absolute and per site, outside the job's app folder, so it survives the end of a job. The personal
state carries the identity of the job that trained it (`job_identity`: the job's name and a fingerprint of its
config). A job opens it with `SiteStore.open`:

- a resume of the same job (same identity, started with a resume round) continues from it: personal tensors, the
  learning-rate schedule's position and DP-SGD's step count;
- any other job starts fresh: the earlier job's file is kept beside it (`personal_state.<job>.<round>.pt`), never
  overwritten, and one line says so;
- a resume whose identity differs stops with a one-line StateError.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

PERSONAL_FILE = "personal_state.pt"


class StateError(ValueError):
    """A site's saved state cannot be used as is; the message says why and what to do."""

METRICS_FILE = "metrics.jsonl"


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a half file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class SiteStore:
    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        for name in os.listdir(self.folder):  # a write killed mid-way leaves only its temp file behind
            if name.startswith(f".{PERSONAL_FILE}.") and name.endswith(".tmp"):
                os.remove(os.path.join(self.folder, name))

    @property
    def personal_path(self) -> str:
        return os.path.join(self.folder, PERSONAL_FILE)

    def save_personal(self, state: dict, round_num: int, method: str, metrics: dict, job: str = "") -> None:
        atomic_torch_save({"state": state, "round": round_num, "method": method, "metrics": metrics, "job": job},
                          self.personal_path)

    def load_personal(self) -> dict | None:
        """The saved personal state, or None; StateError (one line, nothing moved) for a file this version cannot
        read."""
        if not os.path.isfile(self.personal_path):
            return None
        try:
            saved = torch.load(self.personal_path, map_location="cpu", weights_only=True)
        except Exception as err:  # damaged, foreign, or needing pickle: never executed, never overwritten
            raise StateError(f"{self.personal_path}: cannot be read as a personal state ({type(err).__name__}). "
                             "Fix: move the file away (FedOPAL reads and overwrites nothing there until then).") from None
        if not isinstance(saved, dict) or "round" not in saved or "state" not in saved:
            raise StateError(f"{self.personal_path}: not a personal state FedOPAL wrote (no 'round' and 'state'). "
                             "Fix: move the file away.")
        return saved

    def open(self, job: str, resume_round: int | None) -> tuple[dict | None, str]:
        """(the personal state to continue from, or None; one line saying what happened). job: job_identity(cfg);
        resume_round: the last round the job being resumed finished (None: a new job). Raises StateError for a
        resume of another job's state."""
        saved = self.load_personal()
        if saved is None:
            if resume_round is not None:
                return None, (f"resuming after round {resume_round + 1}, but {self.personal_path} holds no personal "
                              "state (the site had not finished a round): starting this site fresh")
            return None, "new job: no earlier personal state here, starting fresh"
        if resume_round is not None:
            if saved.get("job") != job:
                raise StateError(
                    f"{self.personal_path}: holds the personal state of job {saved.get('job') or 'unknown'!r}, not "
                    f"{job!r} that is being resumed. Fix: resume with the aborted job's own config, or run it as a "
                    "new job (without --resume), which keeps that file and starts fresh.")
            return saved, f"resumed the personal state saved at round {saved['round'] + 1} of this job"
        kept = self.keep_aside(saved)
        return None, (f"new job: the personal state of job {saved.get('job') or saved.get('method')!r} (round "
                      f"{saved['round'] + 1}) is not continued; kept as {kept}, starting fresh")

    def keep_aside(self, saved: dict) -> str:
        """Rename the current personal state file so that a new job never overwrites it; returns the new path."""
        tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(saved.get("job") or saved.get("method")))
        target = os.path.join(self.folder, f"personal_state.{tag}.round{saved['round'] + 1}.pt")
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(self.folder, f"personal_state.{tag}.round{saved['round'] + 1}.{n}.pt")
        os.replace(self.personal_path, target)
        return target

    def append_metrics(self, record: dict) -> None:
        with open(os.path.join(self.folder, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


# config keys that do not change what a job trains, so a resume may change them
_NOT_IDENTITY = {("train", "num_rounds"), ("site_state_dir",), ("federation", "straggler_wait_s"),
                 ("federation", "min_clients"), ("federation", "task_request_interval_s")}


def job_identity(job_config: dict) -> str:
    """'<name>@<12 hex>': the job's name and the SHA-256 of its config (fedopal.config.job_dict), without the keys a
    resume may change (number of rounds, where the state lives, straggler handling)."""
    cfg = json.loads(json.dumps(job_config))
    for path in _NOT_IDENTITY:
        node = cfg
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return f"{job_config.get('name', 'job')}@{digest}"


def simulation_state_root(job_ws: str) -> str:
    """In the simulator, sites keep their state beside the job's workspace, not in it: the simulator wipes
    its workspace when it starts, and a resumed job must find the personal state of the aborted one."""
    return job_ws.rstrip(os.sep) + "_site_state"


def read_metrics(folder: str) -> list[dict]:
    path = os.path.join(folder, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
