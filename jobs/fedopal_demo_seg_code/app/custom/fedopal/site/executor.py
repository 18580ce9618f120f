"""The executor a FedOPAL job names at every site: NVFlare's Client API executor, running FedOPAL's site script.

A job carries no path and no code for it: the site script is the one beside this file (`client.py`), i.e. the one in
the fedopal runtime the site installed, or, for a code-shipping (rehearsal) job, the copy in the job's custom/ folder
that FLARE puts first on the path. The job's resolved config (fedopal.config.job_dict) travels as this component's
`job_config` argument, in the job's config_fed_client.json, readable by the site's IT before it runs.

At START_RUN the site checks that its fedopal is the version the job was built for (`built_for`); on a mismatch it
logs one line naming both and stops the job at this site (nothing is trained, nothing is sent).
"""

from __future__ import annotations

import base64
import json
import os

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.client.config import ExchangeFormat

import fedopal

SITE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.py")
SITE_MODULE = "fedopal.site.client"


def encode_config(job_config: dict) -> str:
    """The job config as one whitespace-free argument of the site script (urlsafe base64 of its JSON)."""
    return base64.urlsafe_b64encode(json.dumps(job_config, sort_keys=True).encode()).decode("ascii")


def decode_config(encoded: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(encoded.encode("ascii")))


def version_mismatch(built_for: str, installed: str = fedopal.__version__) -> str | None:
    """The one line a site logs when its fedopal is not the job's, else None."""
    if built_for == installed:
        return None
    return (f"fedopal {installed} is installed at this site, but the job was built for fedopal {built_for}: this site "
            f"does not run it. Fix: install fedopal=={built_for} (docs/deploy.md, 'Upgrade'), or export the job "
            f"again with fedopal {installed}.")


class FedOpalSiteExecutor(ClientAPIExecutor):
    """Args (stored under the same names: FLARE's job export reads them back):
        job_config: the job's resolved config (fedopal.config.job_dict).
        built_for: the fedopal version the job was built with.
        script_args: extra site-script arguments (e.g. "--resume-round 3").
        nproc_per_site: 1 runs the site script in FLARE's process; N > 1 under torchrun, N processes (DDP).
        python: the interpreter torchrun starts (N > 1).
        site_script: a script in the job's custom/ folder to run instead (tests only; code-shipping jobs).
        launch_timeout, shutdown_timeout: FLARE's external-process settings (N > 1)."""

    def __init__(self, job_config: dict, built_for: str, script_args: str = "", nproc_per_site: int = 1,
                 python: str = "python3", site_script: str = "", launch_timeout: float = 300.0,
                 shutdown_timeout: float = 0.0):
        self.job_config = job_config
        self.built_for = built_for
        self.script_args = script_args
        self.nproc_per_site = nproc_per_site
        self.python = python
        self.site_script = site_script
        self.launch_timeout = launch_timeout
        self.shutdown_timeout = shutdown_timeout
        args = f"--config-b64 {encode_config(job_config)} {script_args}".split()
        common = {"params_exchange_format": ExchangeFormat.PYTORCH}
        if nproc_per_site == 1:
            super().__init__(execution_mode="in_process", task_script_path=site_script or SITE_SCRIPT,
                             task_script_args=" ".join(args), **common)
        else:
            # --standalone picks a free rendezvous port, so sites sharing a machine (simulator, POC) do not collide
            torchrun = [python, "-u", "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                        f"--nproc_per_node={nproc_per_site}"]
            script = [f"custom/{site_script}"] if site_script else ["-m", SITE_MODULE]
            super().__init__(execution_mode="external_process", command=torchrun + script + args, launch_once=True,
                             launch_timeout=launch_timeout, shutdown_timeout=shutdown_timeout, **common)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            problem = version_mismatch(self.built_for)
            if problem:
                self.log_error(fl_ctx, problem, fire_event=False)
                self.system_panic(problem, fl_ctx)
                return
        super().handle_event(event_type, fl_ctx)
