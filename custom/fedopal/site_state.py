"""What a site keeps on its own disk: the personal state (atomic, every round) and its metrics log.

The folder is absolute and per site, outside the job's app folder, so it survives the end of a job.
"""

from __future__ import annotations

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

    def save_personal(self, state: dict, round_num: int, method: str, metrics: dict) -> None:
        atomic_torch_save({"state": state, "round": round_num, "method": method, "metrics": metrics},
                          self.personal_path)

    def load_personal(self) -> dict | None:
        if not os.path.isfile(self.personal_path):
            return None
        return torch.load(self.personal_path, map_location="cpu", weights_only=True)

    def resume(self, method: str) -> dict | None:
        """The personal state a previous (aborted or finished) job of this site left, if any.

        It is never overwritten by a job of another method: that stops with a clear error instead."""
        saved = self.load_personal()
        if saved is not None and saved["method"] != method:
            raise StateError(
                f"{self.personal_path}: holds the personal state of method {saved['method']!r} (round "
                f"{saved['round']}), not {method!r}. Fix: set site_state_dir to another folder for this job, "
                "or move that file away if it is no longer needed.")
        return saved

    def append_metrics(self, record: dict) -> None:
        with open(os.path.join(self.folder, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


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
