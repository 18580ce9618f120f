"""The site script FLARE runs (Client API): one hospital's side of every round.

Everything that crosses the network is in the numbered steps; the rest is plain PyTorch.
The model and the data are built once per job; the personal state stays in this site's folder.

One process per site by default (in-process Client API). With train.nproc_per_site > 1, FLARE starts this script
under torchrun and every process trains the same model with DDP (fedopal.distributed): rank 0 alone talks to FLARE
and writes to disk; the other ranks get what it received through `broadcast` and train beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# (1) import nvflare client API
import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel, ParamsType
from nvflare.client.tracking import SummaryWriter

from fedopal import distributed
from fedopal.adapters import build_model, count_params, nbytes, tensor_norm
from fedopal.config import load_config
from fedopal.data import build_datasets, read_manifest, resolve_path, site_manifest_path
from fedopal.device import check_precision, describe, resolve_device
from fedopal.export import SiteExporter
from fedopal.methods import NOTHING_SHARED_KEY, get_method
from fedopal.privacy import DP_META_KEY
from fedopal.site_state import SiteStore
from fedopal.train import SiteTrainer
from fedopal.validate import check_site

TRAIN, STOP = "train", "stop"  # what rank 0 tells the other ranks of a multi-process site each round


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="fedopal_job.json", help="relative to the app's custom/ folder")
    parser.add_argument("--test-leak-personal", action="store_true",
                        help="TEST ONLY: also send the personal tensors, to prove a site's privacy filter stops them")
    args = parser.parse_args(argv)
    custom_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_path = args.config if os.path.isabs(args.config) else os.path.join(custom_dir, args.config)
    cfg = load_config(config_path)
    torch.set_num_threads(cfg.train.threads)
    ctx = distributed.init_from_env(cfg.train.device)  # None: a single process
    main_rank = ctx is None or ctx.is_main

    # (2) initialize the NVFlare client API; the site name comes from FLARE (to rank 0; it tells the others)
    flare.init(rank=str(ctx.rank) if ctx else None)
    site = distributed.broadcast(flare.get_site_name() if main_rank else None, ctx)
    spec = get_method(cfg.train.method, cfg.model.head)
    device = resolve_device(cfg.train.device, ctx.local_rank if ctx else None)
    check_precision(device, cfg.train.precision)

    # Validate and cache this site's data, and build the model, once per job (not per round).
    manifest = site_manifest_path(cfg, site)
    # every row and file, before any training (rank 0; the others read the manifest it checked)
    samples = check_site(cfg, site, manifest) if main_rank else read_manifest(manifest, cfg.data.num_classes,
                                                                                cfg.data.class_names)
    model = build_model(cfg, spec, site_name=site)
    datasets = build_datasets(cfg.data, samples, model.in_channels, model.normalization, manifest, cfg.train.seed)
    if cfg.privacy.enabled and cfg.privacy.mode == "dpsgd":  # patient-level DP-SGD over every trained tensor
        from fedopal.dpsgd import DPSGDTrainer

        trainer = DPSGDTrainer(model, datasets, cfg.train, cfg.data.batch_size, cfg.data.num_workers, device,
                               privacy=cfg.privacy)
    else:
        trainer = SiteTrainer(model, datasets, cfg.train, cfg.data.batch_size, cfg.data.num_workers, device, ctx)
    store = SiteStore(os.path.join(resolve_path(cfg.site_state_dir or os.path.join(os.getcwd(), "fedopal_site_state")),
                                   site)) if main_rank else None
    # an aborted or earlier job of this site left its personal state
    resumed = distributed.broadcast(store.resume(spec.name) if main_rank else None, ctx)
    if resumed is not None:
        model.load_site_state(resumed["state"])
        trainer.rounds_done = resumed["round"] + 1  # the learning-rate schedule continues from here too
    if not main_rank:
        follow(trainer, ctx)
        return

    exporter = SiteExporter(model, cfg, store.folder, site, datasets["train"], run_id=flare.get_job_id(),
                            weighting=trainer.instance_weighting)
    writer = SummaryWriter()
    trainable = count_params({k: v for k, v in model.state_dict().items() if k in set(model.trainable_keys())})
    where = (f"{ctx.world} processes (DDP), rank 0 on " if ctx else "") + describe(device, cfg.train.precision,
                                                                                   cfg.train.threads)
    print(f"[{site}] training on {where}")
    if resumed is not None:
        print(f"[{site}] resumed the personal state saved at round {resumed['round']}")
    print(f"[{site}] {spec.name}: {trainer.num_train_samples} training images, {trainable} trainable params, "
          f"personal state in {store.folder}")

    while flare.is_running():
        # (3) receive the global (shared) tensors from the server
        input_model = flare.receive()
        if input_model is None:
            break
        round_num = input_model.current_round or 0
        received = {k: v for k, v in (input_model.params or {}).items() if k != NOTHING_SHARED_KEY}
        model.load_shared(received)

        if flare.is_submit_model():
            flare.send(FLModel(params=model.shared_state()))
            continue
        if flare.is_evaluate():
            flare.send(FLModel(metrics=trainer.evaluate()))
            continue

        # (4) local training on this site's data: L_task + lambda * L_orth, as the method spec says
        start = time.time()
        distributed.broadcast((TRAIN, received), ctx)
        train_stats = trainer.train_round()
        # (5) evaluate the personalized and the global-only model on this site's val/test split
        metrics = trainer.evaluate()
        diagnostics = trainer.diagnostics()  # dual methods: how far apart the two adapters are
        # the update: what training changed in the shared tensors (a DIFF, so a DP filter can clip and noise it)
        update = shared_update(model.shared_state(), received)
        outgoing = {**update, **model.site_state()} if args.test_leak_personal else update
        store.save_personal(model.site_state(), round_num, spec.name, metrics)
        exporter.write(round_num, metrics, cfg.train.num_rounds)  # <site state>/export/: the usable model
        record = {"round": round_num, "site": site, "method": spec.name, "n_train": trainer.num_train_samples,
                  "bytes_sent": nbytes(outgoing), "trainable_params": trainable,
                  "wall_s": round(time.time() - start, 3), "started_at": start, "finished_at": time.time(),
                  "received_norm": tensor_norm(received), "device": where,
                  "resumed_from_round": resumed["round"] if resumed else None, **train_stats, **metrics,
                  **diagnostics}
        store.append_metrics(record)
        for tag in ("task_loss", "orth_loss", "lr_first"):
            writer.add_scalar(f"train/{tag}", train_stats[tag], global_step=round_num)
        meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: trainer.num_train_samples}
        if "epsilon" in train_stats:  # DP-SGD: this site's privacy loss so far (update mode: the filter reports it)
            writer.add_scalar("privacy/epsilon", train_stats["epsilon"], global_step=round_num)
            print(f"[{site}] round {round_num}: DP-SGD epsilon {train_stats['epsilon']:.3f} at delta "
                  f"{cfg.privacy.delta:g} (noise multiplier {train_stats['noise_multiplier']:.3f}, "
                  f"{train_stats['dp_steps']} steps, sample rate {train_stats['sample_rate']:.4f})")
            meta[DP_META_KEY] = [trainer.dp_record()]
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, global_step=round_num)
        for tag, value in diagnostics.items():
            writer.add_scalar(f"diagnostics/{tag}", value, global_step=round_num)
        print(f"[{site}] round {round_num}: task loss {train_stats['task_loss']:.4f}, "
              f"test bal. acc. {metrics['personalized/test/balanced_accuracy']:.3f}")

        # (6) send only the update of the shared tensors (CPU, float32), weighted by the training samples; the job's
        #     and the site's result filters then apply (privacy: allow-list, clip + noise; transfer quantization)
        flare.send(FLModel(params=outgoing, params_type=ParamsType.DIFF, metrics=metrics, meta=meta))
    distributed.broadcast((STOP, None), ctx)
    distributed.shutdown(ctx)


def shared_update(shared: dict, received: dict) -> dict:
    """shared - received, key by key (CPU float32 tensors): the round's update of the shared tensors."""
    missing = sorted(set(shared) - set(received))
    if missing:
        raise KeyError(f"the server sent no value for {len(missing)} shared tensor(s), e.g. {missing[0]}")
    return {k: v - torch.as_tensor(received[k], dtype=v.dtype).reshape(v.shape) for k, v in shared.items()}


def follow(trainer: SiteTrainer, ctx: distributed.DistContext) -> None:
    """A rank other than 0: train each round on what rank 0 received, until it says stop."""
    while True:
        command, received = distributed.broadcast(None, ctx)
        if command == STOP:
            break
        trainer.model.load_shared(received)
        trainer.train_round()
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])
