"""What the site script does once per job and once per round, besides talking to FLARE (fedopal.site.client).

`SiteRuntime.start` checks this site's data, builds the model and the trainer, opens the site's own state (a resume of
the same job continues it; any other job starts fresh) and prints where everything is. Per round, `train_round`
trains (rank 0 tells the other processes of a multi-process site to train beside it), `keep` writes what stays on
the site (personal state, exports, the metrics log) and `outgoing` builds what the job's wire policy lets the site
send: the update, the metrics it allows, the aggregation weight if it allows it, the DP record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

import fedopal
from fedopal.config import HEADLINE, FedOpalConfig, job_dict
from fedopal.model.adapters import build_model, count_params, nbytes, tensor_norm
from fedopal.site import distributed
from fedopal.site.data import build_datasets, patient_index, read_manifest, resolve_path, site_manifest_path
from fedopal.site.device import check_precision, describe, resolve_device
from fedopal.site.export import SiteExporter
from fedopal.site.selection import first_eligible_round
from fedopal.site.state import SiteStore, job_identity
from fedopal.site.train import SiteTrainer
from fedopal.site.validate import check_site
from fedopal.specs.contract import DP_META_KEY, NUM_SAMPLES_KEY, TRAIN, WirePolicy, policy_for_job
from fedopal.specs.methods import NOTHING_SHARED_KEY, get_method

TRAIN_CMD, STOP_CMD = "train", "stop"  # what rank 0 tells the other ranks of a multi-process site each round


def job_policy(cfg: FedOpalConfig) -> WirePolicy:
    """The job's own wire policy (specs.contract.policy_for_job); a site's privacy.json may be stricter."""
    spec = get_method(cfg.train.method, cfg.model.head)
    return policy_for_job(spec.shared, cfg.privacy.enabled, cfg.privacy.allow_fields)


def shared_update(shared: dict, received: dict) -> dict:
    """shared - received, key by key (CPU float32 tensors): the round's update of the shared tensors."""
    missing = sorted(set(shared) - set(received))
    if missing:
        raise KeyError(f"the server sent no value for {len(missing)} shared tensor(s), e.g. {missing[0]}")
    return {k: v - torch.as_tensor(received[k], dtype=v.dtype).reshape(v.shape) for k, v in shared.items()}


@dataclass
class SiteRuntime:
    cfg: FedOpalConfig
    site: str
    ctx: distributed.DistContext | None
    trainer: SiteTrainer
    store: SiteStore | None = None
    exporter: SiteExporter | None = None
    writer: object | None = None
    policy: WirePolicy = field(default_factory=WirePolicy)
    job: str = ""
    resumed_round: int | None = None
    where: str = ""

    @property
    def model(self):
        return self.trainer.model

    @classmethod
    def start(cls, cfg: FedOpalConfig, site_name: str | None, ctx, resume_round: int | None, job_id: str | None):
        """Once per job: data, model, trainer, state. site_name: FLARE's (rank 0 only; the others are told)."""
        site = distributed.broadcast(site_name, ctx)
        main = ctx is None or ctx.is_main
        job = job_identity(job_dict(cfg))  # the job's, the same at every site
        cfg = cfg.model_copy(update={"data": cfg.data.for_site(site)})  # this site's own decoding (data.sites)
        spec = get_method(cfg.train.method, cfg.model.head)
        device = resolve_device(cfg.train.device, ctx.local_rank if ctx else None)
        check_precision(device, cfg.train.precision)
        manifest = site_manifest_path(cfg, site)
        # every row and file, before any training (rank 0; the others read the manifest it checked)
        samples = check_site(cfg, site, manifest) if main else read_manifest(
            manifest, cfg.data.num_classes, cfg.data.class_names, task=cfg.data.task)
        model = build_model(cfg, spec, site_name=site)
        datasets = build_datasets(cfg.data, samples, model.in_channels, model.normalization, manifest, cfg.train.seed)
        dpsgd = cfg.privacy.enabled and cfg.privacy.mode == "dpsgd"
        trainer = SiteTrainer(model, datasets, cfg.train, cfg.data.batch_size, cfg.data.num_workers, device, ctx,
                              privacy=cfg.privacy if dpsgd else None, patient_of=patient_index(samples),
                              roi_size=cfg.data.roi_size, class_name=cfg.data.class_name)
        run = cls(cfg, site, ctx, trainer, policy=job_policy(cfg), job=job)
        state, note = None, ""
        if main:
            folder = resolve_path(cfg.site_state_dir or os.path.join(os.getcwd(), "fedopal_site_state"))
            run.store = SiteStore(os.path.join(folder, site))
            state, note = run.store.open(run.job, resume_round)
        state = distributed.broadcast(state, ctx)
        if state is not None:
            model.load_site_state(state["state"])
            trainer.rounds_done = state["round"] + 1  # the learning-rate schedule and DP-SGD's steps continue
            run.resumed_round = state["round"]
        if main:
            run.exporter = SiteExporter(model, cfg, run.store.folder, site, datasets["train"], run_id=job_id,
                                        weighting=trainer.instance_weighting,
                                        first_eligible_round=first_eligible_round(cfg))
            run.where = (f"{ctx.world} processes (DDP), rank 0 on " if ctx else "") + describe(
                device, cfg.train.precision, cfg.train.threads)
            print(f"[{site}] fedopal {fedopal.__version__}, job {run.job}, training on {run.where}")
            print(f"[{site}] {note}")
            print(f"[{site}] {spec.name}: {trainer.num_train_samples} training images, {run.trainable} trainable "
                  f"params, personal state in {run.store.folder}")
        return run

    @property
    def trainable(self) -> int:
        keys = set(self.model.trainable_keys())
        return count_params({k: v for k, v in self.model.state_dict().items() if k in keys})

    # -- every round ---------------------------------------------------------------------------------------------
    def load_global(self, params: dict | None) -> dict:
        """Load the server's shared tensors into the model; returns them (the placeholder of `local` dropped)."""
        received = {k: v for k, v in (params or {}).items() if k != NOTHING_SHARED_KEY}
        self.model.load_shared(received)
        return received

    def train_round(self, received: dict) -> dict:
        distributed.broadcast((TRAIN_CMD, received), self.ctx)  # the other ranks train beside rank 0
        return self.trainer.train_round()

    def keep(self, round_num: int, received: dict, update: dict, stats: dict, metrics: dict, diagnostics: dict,
             started: float) -> None:
        """What stays on the site: personal state (atomic), exports, the metrics log; and the round's line."""
        self.store.save_personal(self.model.site_state(), round_num, self.model.spec.name, metrics, job=self.job)
        self.exporter.write(round_num, metrics, self.cfg.train.num_rounds)  # <site state>/export/: the usable model
        self.store.append_metrics({  # rounds from 1 in the log, as everywhere a person reads them (FLARE's are 0-based)
            "round": round_num + 1, "site": self.site, "method": self.model.spec.name, "job": self.job,
            "fedopal_version": fedopal.__version__, "n_train": self.trainer.num_train_samples,
            "bytes_sent": nbytes(update), "trainable_params": self.trainable, "wall_s": round(time.time() - started, 3),
            "started_at": started, "finished_at": time.time(), "received_norm": tensor_norm(received),
            "device": self.where,
            "resumed_from_round": None if self.resumed_round is None else self.resumed_round + 1,
            "first_eligible_round": first_eligible_round(self.cfg), **stats, **metrics, **diagnostics})
        if "epsilon" in stats:
            print(f"[{self.site}] round {round_num + 1}: DP-SGD epsilon {stats['epsilon']:.3f} per {stats['unit']} at "
                  f"delta {self.cfg.privacy.delta:g} (noise multiplier {stats['noise_multiplier']:.3f}, "
                  f"{stats['dp_steps']} steps)")
        headline = HEADLINE[self.cfg.data.task]
        print(f"[{self.site}] round {round_num + 1}: task loss {stats['task_loss']:.4f}, "
              f"test {headline.replace('_', ' ')} {metrics[f'personalized/test/{headline}']:.3f}")

    def allowed(self, values: dict, where: str, task: str = TRAIN) -> dict:
        """The entries of `values` the job's wire policy lets out (metrics, tracking tags)."""
        return {k: v for k, v in values.items() if self.policy.allows(where, k, task)}

    def track(self, round_num: int, stats: dict, metrics: dict, diagnostics: dict) -> None:
        """Experiment tracking (TensorBoard on the server): only the tags the job's policy allows."""
        if self.writer is None:
            from nvflare.client.tracking import SummaryWriter

            self.writer = SummaryWriter()
        tags = {**{f"train/{k}": stats[k] for k in ("task_loss", "orth_loss", "lr_first") if k in stats},
                **metrics, **{f"diagnostics/{k}": v for k, v in diagnostics.items()}}
        if "epsilon" in stats:
            tags["privacy/epsilon"] = stats["epsilon"]
        for tag, value in self.allowed(tags, "event_tag", "event").items():
            if value is not None:
                self.writer.add_scalar(tag, value, global_step=round_num + 1)  # TensorBoard's step: the round, from 1

    def outgoing(self, update: dict, metrics: dict) -> FLModel:
        """The train result: the update (a DIFF, so that a DP filter can clip and noise it), the metrics and meta
        the job's policy allows, and DP-SGD's record."""
        meta = {}
        if self.policy.allows("meta", NUM_SAMPLES_KEY, TRAIN):
            meta[NUM_SAMPLES_KEY] = self.trainer.num_train_samples
        if self.trainer.privacy is not None:  # DP-SGD: what the mechanism did (update mode: the filter says it)
            meta[DP_META_KEY] = [self.trainer.dp_record()]
        return FLModel(params=update, params_type=ParamsType.DIFF, metrics=self.allowed(metrics, "metric"),
                       meta=meta)

    def follow(self) -> None:
        """A rank other than 0: train each round on what rank 0 received, until it says stop."""
        while True:
            command, received = distributed.broadcast(None, self.ctx)
            if command == STOP_CMD:
                break
            self.model.load_shared(received)
            self.trainer.train_round()
        distributed.shutdown(self.ctx)

    def stop(self) -> None:
        distributed.broadcast((STOP_CMD, None), self.ctx)
        distributed.shutdown(self.ctx)
