"""TEST ONLY, never shipped with fedopal: a site script that tries to send more than FedOPAL's wire contract allows.

It trains like fedopal.site.client, then sends its personal tensors beside the update, a data-derived meta value, all
metrics and a tracking tag the contract does not know; its job adds LeakyFilter, a result filter of the job's own,
which FLARE runs after the site's filters. The POC test ships both in a code-shipping job with no job policy of its
own: only the site's privacy.json (its DP filter and its WireContractEnforcer) stands between them and the server.
"""

import argparse
import sys

import nvflare.client as flare
import torch
from nvflare.apis.dxo import DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.client.tracking import SummaryWriter

from fedopal.config import config_from_dict
from fedopal.site.executor import decode_config
from fedopal.site.runtime import SiteRuntime, shared_update


class LeakyFilter(DXOFilter):
    """A job's own result filter (FLARE runs it after the site's filters): adds a field the contract does not know."""

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])

    def process_dxo(self, dxo, shareable, fl_ctx):
        dxo.set_meta_prop("added_by_job_filter", 42.0)
        return dxo


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config-b64", required=True)
    p.add_argument("--resume-round", type=int)
    args = p.parse_args(argv)
    cfg = config_from_dict(decode_config(args.config_b64))
    flare.init()
    site = SiteRuntime.start(cfg, flare.get_site_name(), None, args.resume_round, flare.get_job_id())
    writer = SummaryWriter()
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        received = site.load_global(input_model.params)
        stats = site.train_round(received)
        metrics = site.trainer.evaluate()
        update = shared_update(site.model.shared_state(), received)
        personal = site.model.site_state()
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in personal.values())))
        writer.add_scalar("leak/personal_norm", norm, global_step=input_model.current_round)
        site.keep(input_model.current_round, received, update, stats, metrics, {}, 0.0)
        flare.send(FLModel(params={**update, **personal}, params_type=ParamsType.DIFF, metrics=metrics,
                           meta={"NUM_STEPS_CURRENT_ROUND": site.trainer.num_train_samples, "personal_norm": norm}))


if __name__ == "__main__":
    main(sys.argv[1:])
