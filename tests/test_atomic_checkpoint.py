"""A checkpoint write that is killed half-way leaves the previous checkpoint intact and loadable."""

import glob
import os
import signal
import subprocess
import sys
import time

import torch

from fedopal.site.state import PERSONAL_FILE, SiteStore

from conftest import REPO

WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from fedopal.site.state import SiteStore
store = SiteStore(sys.argv[1])
big = {"w": torch.randn(64_000_000)}  # ~256 MB: a write that takes a while
while True:
    store.save_personal(big, 99, "fedopal_w", {})
"""


def test_killed_write_keeps_the_previous_checkpoint(tmp_path):
    store = SiteStore(str(tmp_path))
    previous = {"backbone.x.lora_A.personal.weight": torch.arange(6.0).reshape(2, 3)}
    store.save_personal(previous, 4, "fedopal_w", {"personalized/val/balanced_accuracy": 0.8})

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), os.path.join(REPO, "custom")])
    try:
        deadline = time.time() + 120
        while not glob.glob(str(tmp_path / f".{PERSONAL_FILE}.*.tmp")):  # the big write has started
            assert proc.poll() is None and time.time() < deadline, "the writer never started writing"
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # a crash in the middle of torch.save
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert glob.glob(str(tmp_path / f".{PERSONAL_FILE}.*.tmp"))  # the half-written temp file is there...
    loaded = SiteStore(str(tmp_path)).load_personal()  # ...a restarted site cleans it up and loads
    assert loaded["round"] == 4 and torch.equal(loaded["state"]["backbone.x.lora_A.personal.weight"],
                                                previous["backbone.x.lora_A.personal.weight"])
    assert not glob.glob(str(tmp_path / f".{PERSONAL_FILE}.*.tmp"))
