"""The site script FLARE runs at every hospital (Client API): one site's side of every round.

Everything that crosses the network is in the numbered steps; the rest is in fedopal.site.runtime (data, model and
state once per job; what stays on the site each round; what the job's wire policy lets out). With
train.nproc_per_site > 1, FLARE starts this script under torchrun: rank 0 alone talks to FLARE, the others follow.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

# (1) import nvflare client API
import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel

from fedopal.config import config_from_dict
from fedopal.site import distributed
from fedopal.site.executor import decode_config
from fedopal.site.runtime import SiteRuntime, shared_update
from fedopal.specs.contract import VALIDATE


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="FedOPAL's site script (FLARE starts it; see fedopal.site.executor)")
    p.add_argument("--config-b64", required=True, help="the job's config (the executor's job_config, encoded)")
    p.add_argument("--resume-round", type=int, help="resuming a job whose last finished round was this (0-based)")
    args = p.parse_args(argv)
    cfg = config_from_dict(decode_config(args.config_b64), source="the job's config")
    torch.set_num_threads(cfg.train.threads)
    ctx = distributed.init_from_env(cfg.train.device)  # None: a single process

    # (2) initialize the NVFlare Client API (rank 0 talks to FLARE), then this site's data, model and state
    flare.init(rank=str(ctx.rank) if ctx else None)
    main_rank = ctx is None or ctx.is_main
    site = SiteRuntime.start(cfg, flare.get_site_name() if main_rank else None, ctx, args.resume_round,
                             flare.get_job_id() if main_rank else None)
    if not main_rank:
        site.follow()
        return

    while flare.is_running():
        # (3) receive the global model (the shared tensors) from the server, and load it
        input_model = flare.receive()
        if input_model is None:
            break
        received = site.load_global(input_model.params)
        if flare.is_evaluate():  # NVFlare's cross-site evaluation of the final global model: metrics only
            flare.send(FLModel(metrics=site.allowed(site.trainer.evaluate(), "metric", VALIDATE)))
            continue
        if not flare.is_train():  # e.g. submit_model: the wire contract sends no model on any other task
            print(f"[{site.site}] refused task {flare.get_task_name()!r}: not in FedOPAL's wire contract")
            flare.send(FLModel(metrics={}))
            continue
        round_num, started = input_model.current_round or 0, time.time()

        # (4) train locally: L_task + lambda * L_orth, as the method spec says
        stats = site.train_round(received)

        # (5) evaluate the personalized and the global-only model on this site's validation and test splits
        metrics, diagnostics = site.trainer.evaluate(), site.trainer.diagnostics()

        # (6) keep what stays here: personal state, exports, metrics log (this site's disk only)
        update = shared_update(site.model.shared_state(), received)
        site.keep(round_num, received, update, stats, metrics, diagnostics, started)
        site.track(round_num, stats, metrics, diagnostics)

        # (7) send the update of the shared tensors and what the job's wire policy allows; then the DP filter (update
        #     mode), the quantizer and, last, the site's own wire-contract enforcer apply
        flare.send(site.outgoing(update, metrics))
    site.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
