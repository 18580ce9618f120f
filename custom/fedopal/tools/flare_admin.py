"""The FLARE API as the project admin, headless: what `fedopal select` and poc_setup/poc.py do with a deployment.

A session is opened per call (new_secure_session with the admin's startup kit), so a long wait holds no connection
that the server may drop; FLARE's connection chatter goes to stderr.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile


class FlareAdmin:
    """Submit a job folder, wait for it, download its result, as `username` with the startup kit `admin_kit`."""

    def __init__(self, username: str, admin_kit: str):
        self.username, self.admin_kit = username, admin_kit

    @contextlib.contextmanager
    def session(self):
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        with contextlib.redirect_stdout(sys.stderr):  # FLARE prints its connection chatter
            sess = new_secure_session(self.username, self.admin_kit, timeout=30.0)
        try:
            yield sess
        finally:
            sess.close()

    def submit(self, job_folder: str) -> str:
        """The job id. FLARE signs the folder it submits, in place: a copy is submitted, the folder stays as is."""
        with tempfile.TemporaryDirectory() as tmp, self.session() as sess:
            return sess.submit_job(shutil.copytree(job_folder, os.path.join(tmp, os.path.basename(job_folder))))

    def wait(self, job_id: str, timeout_s: float, cb=None) -> tuple[bool, dict]:
        """(timed out?, the job's meta) once the job ends or `timeout_s` passes; `cb` is FLARE's monitor callback."""
        from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

        with self.session() as sess:
            code, meta = sess.monitor_job_and_return_job_meta(job_id, timeout=timeout_s, poll_interval=2.0, cb=cb)
        return code == MonitorReturnCode.TIMEOUT, meta or {}

    def download(self, job_id: str, out_dir: str) -> str:
        """The job's result as the server keeps it: <out_dir>/<job_id>/workspace/... and the job."""
        with self.session() as sess:
            return sess.download_job_result(job_id, os.path.abspath(out_dir))
