"""What FLARE and FedOPAL add on top of the local compute, and what a site sends: measured side by side.

    fedopal perf [--quick]

(a) loop_ratio: images/s of the site training loop (SiteTrainer) / a bare torch + peft loop, same model,
    batches, data and threads.
(b) round_overhead_ratio: the simulator's wall time per round / the bare compute of the same steps (both
    sites' train + evaluate, in parallel on the machine's cores); startup_s, the job's fixed start, apart.
(c) bytes_fraction: bytes a site actually sent per round (the server's log) / the whole model, for FedOPAL on
    a ViT-S-sized MONAI ViT (dim 384, depth 12, r=8); and sent / the raw global-adapter floor on every backbone.
(d) peak_rss_mb of a site process in the simulator, against bare_peak_rss_mb of the bare loop in its own process.
(e) scaling: 2, 4, 8, 16 simulated sites sharing a fixed total amount of data: seconds per round.
Prints a table and writes results/perf/summary.json. Nothing here is a test: the numbers are for reading.

    fedopal perf --config app_configs/demo_seg.yaml      # a segmentation config (data.task: segmentation)

(s) seg_loop_ratio: images/s of the site loop (SiteTrainer, DiceCE) on the config's site-1 / a bare MONAI + peft loop
    (the same MONAI network, built with the same arguments and seed; peft LoRA `global` + `personal` on the same
    encoder modules, both active; the decoder trained; monai DiceCELoss + the spec's orthogonality; AdamW) on the
    same batches, each loop in its own process (its peak RSS its own), best of 5 interleaved runs. Writes
    results/perf/summary_seg.json (the classification parts do not apply to a segmentation config).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import psutil
import torch
import torch.nn.functional as F

import fedopal
from fedopal.model.adapters import build_model, nbytes
from fedopal.config import FedOpalConfig, config_from_dict, load_config
from fedopal.site.data import batch_sizes, build_datasets, loader, site_manifest_path
from fedopal.site.device import autocast, grad_scaler, resolve_device
from fedopal.specs.methods import get_method
from fedopal.model.orthogonality import RepresentationOrthogonality, weight_orthogonality
from fedopal.tools.report import collect_site_records
from fedopal.site.train import SiteTrainer
from fedopal.site.validate import check_site

VIT_S = {"patch_size": 16, "hidden_size": 384, "mlp_dim": 1536, "num_layers": 12, "num_heads": 6}
TINY_VIT = {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 3}


def _site(cfg: FedOpalConfig, site: str):
    samples = check_site(cfg, site)
    model = build_model(cfg, get_method(cfg.train.method, cfg.model.head), site)
    datasets = build_datasets(cfg.data.for_site(site), samples, model.in_channels, model.normalization,
                              site_manifest_path(cfg, site), cfg.train.seed)
    return model, datasets


def bare_loop(cfg: FedOpalConfig, site: str, steps: int) -> float:
    model, datasets = _site(cfg, site)
    return bare_steps(model, datasets["train"], cfg, steps)


def bare_steps(model, dataset, cfg: FedOpalConfig, steps: int, device: torch.device | None = None) -> float:
    """Images/s of a plain torch + peft loop: the same model, loss (task + lambda * the spec's orthogonality),
    batches, threads, device and autocast precision as the site, and nothing else (no accumulation, schedule,
    bookkeeping). Two warm-up steps are not timed; on a GPU the clock stops after the last kernel."""
    device = device or resolve_device(cfg.train.device)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    scaler = grad_scaler(device, cfg.train.precision)
    batches = loader(dataset, cfg.data.batch_size, shuffle=True, seed=cfg.train.seed,
                     num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    regularizer = model.spec.regularizer if cfg.train.orth_lambda > 0 else "none"
    rep = RepresentationOrthogonality(model.lora_layers()) if regularizer == "representation" else nullcontext()
    model.train()
    done, images, start = 0, 0, None
    with rep:
        while done < steps + 2:
            for batch in batches:
                if done == 2:  # two warm-up steps
                    _synchronize(device)
                    start, images = time.perf_counter(), 0
                x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
                with autocast(device, cfg.train.precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y.long().view(-1))
                if regularizer == "weight":
                    loss = loss + cfg.train.orth_lambda * weight_orthogonality(model.lora_layers(), cfg.train.orth_on,
                                                                              cfg.train.orth_normalize)
                elif regularizer == "representation":
                    loss = loss + cfg.train.orth_lambda * rep.loss()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                images += len(y)
                done += 1
                if done >= steps + 2:
                    break
    _synchronize(device)
    return images / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def site_loop(cfg: FedOpalConfig, site: str, steps: int) -> float:
    model, datasets = _site(cfg, site)
    return site_steps(model, datasets, cfg, steps)


def site_steps(model, datasets: dict, cfg: FedOpalConfig, steps: int, device: torch.device | None = None) -> float:
    """Images/s of the site's own training loop (SiteTrainer.train_round, as the client runs it) over `steps`
    optimizer steps, after a 2-step warm-up round."""
    device = device or resolve_device(cfg.train.device)
    warm = cfg.train.model_copy(update={"local_steps": 2})
    SiteTrainer(model, datasets, warm, cfg.data.batch_size, cfg.data.num_workers, device).train_round()
    run = cfg.train.model_copy(update={"local_steps": steps})
    trainer = SiteTrainer(model, datasets, run, cfg.data.batch_size, cfg.data.num_workers, device)
    _synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train_round()
    _synchronize(device)
    images = round_images(len(datasets["train"]), cfg.data.batch_size, cfg.train.grad_accum_steps, steps)
    return _timed(images, start, cpu)


# the last timed loop of this process: images, wall seconds, and this process's CPU seconds (with one thread and no
# loader workers, the seconds it computed: unlike the wall clock, not lengthened by other processes on the cores)
LAST_TIMING: dict = {}


def _timed(images: int, start: float, cpu: float) -> float:
    LAST_TIMING.update(images=images, wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu)
    return images / LAST_TIMING["wall_s"]


def round_images(n: int, batch_size: int, grad_accum_steps: int, steps: int) -> int:
    """Images SiteTrainer.train_round reads in `steps` optimizer steps over a split of `n`: every pass ends with a
    shorter batch when batch_size does not divide n (steps x batch_size would count images that were not there)."""
    sizes = batch_sizes(n, batch_size)
    groups = [sum(sizes[i:i + grad_accum_steps]) for i in range(0, len(sizes), grad_accum_steps)]
    return sum(groups[i % len(groups)] for i in range(steps))


def bare_round_s(cfg: FedOpalConfig, sites: list[str]) -> float:
    """One round's compute without FLARE: each site's train + evaluate, in parallel on the cores."""
    times = []
    for site in sites:
        model, datasets = _site(cfg, site)
        trainer = SiteTrainer(model, datasets, cfg.train, cfg.data.batch_size, cfg.data.num_workers,
                              resolve_device(cfg.train.device))
        trainer.train_round()  # warm-up round (first-touch allocations)
        trainer.evaluate()
        start = time.perf_counter()
        trainer.train_round()
        trainer.evaluate()
        times.append(time.perf_counter() - start)
    cores = max(1, min(len(sites), os.cpu_count() or 1))
    return sum(times) / cores if len(sites) > cores else max(times)


class RssSampler(threading.Thread):
    """Peak resident memory of every descendant process (the simulator's site workers) while a job runs."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, {}, threading.Event()

    def run(self):
        me = psutil.Process()
        while not self._done.wait(self.interval):
            for p in me.children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline())
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.peak[cmd] = max(self.peak.get(cmd, 0), rss)

    def stop(self):
        self._done.set()
        self.join(timeout=5)


def simulate_timed(cfg: FedOpalConfig, workspace: str) -> dict:
    from fedopal.tools.bench import received_bytes
    from fedopal.tools.job import simulate

    sampler = RssSampler()
    sampler.start()
    t0 = time.time()
    try:
        job_ws = simulate(cfg, workspace)
    finally:
        sampler.stop()
    records = collect_site_records(job_ws)
    first_start = min(r["started_at"] for rs in records.values() for r in rs if r["round"] == 1)
    last_end = max(r["finished_at"] for rs in records.values() for r in rs)
    rounds = cfg.train.num_rounds
    site_workers = {c: v for c, v in sampler.peak.items() if "simulator_worker" in c or "client" in c}
    return {
        "startup_s": first_start - t0,
        "round_s": (last_end - first_start) / rounds,
        "bytes_received": received_bytes(job_ws),
        "peak_rss": site_workers or sampler.peak,
        "job_ws": job_ws,
    }


def peak_rss_kb() -> int:
    """This process's own peak resident memory (VmHWM, kB). Not getrusage's ru_maxrss: Linux carries the parent's
    high-water mark into a forked child through exec, so every child of a large parent reports at least its size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def max_rss_of_bare_loop(config_path: str, overrides: dict, site: str, steps: int) -> float:
    """The bare loop in its own process, so that its peak RSS is its own."""
    code = ("import json, sys; from fedopal.config import load_config; "
            "from fedopal.tools.perf import bare_loop, peak_rss_kb; "
            "cfg = load_config(sys.argv[1], json.loads(sys.argv[2])); bare_loop(cfg, sys.argv[3], int(sys.argv[4])); "
            "print(peak_rss_kb())")
    out = subprocess.run([sys.executable, "-c", code, config_path, json.dumps(overrides), site, str(steps)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # kB -> MB


def communication(cfg: FedOpalConfig, received: dict) -> dict:
    model = build_model(cfg, get_method(cfg.train.method, cfg.model.head))
    groups = model.state_by_group()
    floor = nbytes({**groups.get("global.A", {}), **groups.get("global.B", {})})
    whole = nbytes({k: v for k, v in model.state_dict().items() if ".personal." not in k})
    sent = sum(received.values()) / max(len(received), 1)
    return {"bytes_sent": sent, "global_adapter_floor": floor, "whole_model": whole,
            "sent_over_floor": sent / floor, "bytes_fraction": sent / whole}


def scaling(base: FedOpalConfig, counts: list[int], total_train: int, rounds: int, workspace: str) -> dict:
    """Fixed total data split across N sites (the demo's PneumoniaMNIST), tiny ViT: seconds per round."""
    from fedopal.tools.prepare import build_federation

    out = {}
    for n in counts:
        root = os.path.join(workspace, f"fed_{n}")
        build_federation("data/medmnist/pneumoniamnist.npz", root, num_sites=n, seed=0,
                         train_per_site=total_train // n, val_per_site=max(8, 160 // n), test_per_site=max(8, 160 // n),
                         min_test_per_class=2, min_val_per_class=2)
        raw = base.model_dump(mode="json")
        raw.update(name=f"perf_scaling_{n}")
        raw["data"].update(root=os.path.abspath(root), image_size=32)
        raw["model"].update(backbone="monai_vit", pretrained=False, vit=TINY_VIT, lora_rank=4)
        raw["train"].update(num_rounds=rounds, local_epochs=1, local_steps=None)
        raw["federation"] = {"num_sites": n}
        timed = simulate_timed(config_from_dict(raw), workspace)
        out[n] = round(timed["round_s"], 2)
        print(f"  scaling: {n:>2} sites x {total_train // n} images: {timed['round_s']:.1f} s/round", flush=True)
    return out


COST_METHODS = ("fedavg_lora", "dual_lora", "fedopal_w", "fedopal_r")
COST_BACKBONES = {"efficientnet_lite0": {},
                  "vit_s": {"model.backbone": "monai_vit", "model.pretrained": False, "model.vit": VIT_S}}


def _site_loop_in_process(config_path: str, overrides: dict, site: str, steps: int) -> tuple[float, float]:
    """(images/s, peak RSS in MB) of the site loop, in a fresh process: its peak RSS is its own."""
    rate, rss, _ = _loop_in_process(config_path, overrides, site, steps, "site_loop")
    return rate, rss


def _loop_in_process(config_path: str, overrides: dict, site: str, steps: int,
                     loop: str) -> tuple[float, float, float]:
    """(images/s, peak RSS in MB, images per CPU second) of `loop` (a function of this module: site_loop,
    bare_seg_loop) in a fresh process with one thread."""
    code = ("import json, sys, torch; torch.set_num_threads(1); from fedopal.config import load_config; "
            f"from fedopal.tools.perf import LAST_TIMING, peak_rss_kb, {loop} as loop; "
            "cfg = load_config(sys.argv[1], json.loads(sys.argv[2])); "
            "rate = loop(cfg, sys.argv[3], int(sys.argv[4])); "
            "print(rate, peak_rss_kb(), LAST_TIMING['images'] / LAST_TIMING['cpu_s'])")
    out = subprocess.run([sys.executable, "-c", code, config_path, json.dumps(overrides), site, str(steps)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{loop} on {site} failed:\n{out.stderr[-3000:]}")
    rate, rss_kb, cpu_rate = out.stdout.strip().splitlines()[-1].split()
    return float(rate), int(rss_kb) / 1024, float(cpu_rate)


def method_cost(config_path: str, steps: int, repeats: int = 3) -> dict:
    """(f) {backbone: {method: {"img_per_s", "peak_rss_mb"}}}: the site loop of fedavg_lora, dual_lora, fedopal_w and
    fedopal_r, fused (the default) and on peft's path ("<method>_unfused"), on EfficientNet-Lite0 and a ViT-S-sized
    MONAI ViT, 64², batch 32, one thread, each in its own process. Every configuration runs `repeats` times,
    interleaved with the others; the fastest run counts (what another process on the machine took is noise)."""
    runs: dict = {}
    for repeat in range(repeats):
        for backbone, model in COST_BACKBONES.items():
            for method in COST_METHODS:
                for fused in (True, False):
                    overrides = {**model, "train.method": method, "model.fused_adapters": fused,
                                 "data.image_size": 64, "data.batch_size": 32}
                    rate, rss = _site_loop_in_process(config_path, overrides, "site-1", steps)
                    name = method if fused else f"{method}_unfused"
                    runs.setdefault((backbone, name), []).append((rate, rss))
                    print(f"  [{repeat + 1}/{repeats}] {backbone:<18} {name:<20} {rate:8.1f} img/s  peak RSS "
                          f"{rss:7.1f} MB", flush=True)
    out: dict = {}
    for (backbone, name), got in runs.items():
        out.setdefault(backbone, {})[name] = {"img_per_s": round(max(r for r, _ in got), 1),
                                              "peak_rss_mb": round(max(m for _, m in got), 1)}
    return out


def method_cost_table(cost: dict) -> str:
    lines = ["| backbone | method | img/s fused | img/s peft path | fused / peft | vs fedavg_lora (fused) | "
             "peak RSS MB fused | peak RSS MB peft path |", "|---|---|---|---|---|---|---|---|"]
    for backbone, rows in cost.items():
        base = rows["fedavg_lora"]["img_per_s"]
        for method in COST_METHODS:
            f, u = rows[method], rows[f"{method}_unfused"]
            lines.append(f"| {backbone} | {method} | {f['img_per_s']:.1f} | {u['img_per_s']:.1f} | "
                         f"{f['img_per_s'] / u['img_per_s']:.2f} | {f['img_per_s'] / base:.2f} | "
                         f"{f['peak_rss_mb']:.0f} | {u['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def method_cost_targets(cost: dict) -> list[tuple[str, float, str]]:
    """fedopal_w and fedopal_r >= 0.9 x fedavg_lora images/s; fedopal_r peak RSS <= 1.1 x fedopal_w."""
    rows = []
    for backbone, r in cost.items():
        for method in ("fedopal_w", "fedopal_r"):
            ratio = r[method]["img_per_s"] / r["fedavg_lora"]["img_per_s"]
            rows.append((f"{method} / fedavg_lora img/s ({backbone})", round(ratio, 3),
                         f">= 0.9 ({'met' if ratio >= 0.9 else 'missed'})"))
        mem = r["fedopal_r"]["peak_rss_mb"] / r["fedopal_w"]["peak_rss_mb"]
        rows.append((f"fedopal_r / fedopal_w peak RSS ({backbone})", round(mem, 3),
                     f"<= 1.1 ({'met' if mem <= 1.1 else 'missed'})"))
    return rows


# -- (s) segmentation: the site loop vs a bare MONAI + peft loop ------------------------------------------------------

def bare_seg_net(cfg: FedOpalConfig) -> torch.nn.Module:
    """The network of the bare segmentation loop, as a MONAI + peft user writes it: MONAI's UNETR / SwinUNETR with
    the arguments FedOPAL's builder passes it (backbones.SEGMENTATION_NETS, under the same seed: the same initial
    weights), peft LoRA adapters `global` and `personal` (model.lora_*) on the same encoder modules, both active;
    the adapters and the decoder (every module outside the encoder) train, the rest is frozen. No FedOPAL wrapper,
    fused forward or method spec: peft's own forward."""
    from peft import LoraConfig, get_peft_model

    from fedopal.model.backbones import SEGMENTATION_NETS

    if cfg.model.backbone not in SEGMENTATION_NETS:
        raise ValueError(f"the bare segmentation loop builds a MONAI network ({', '.join(SEGMENTATION_NETS)}); "
                         f"model.backbone is '{cfg.model.backbone}'")
    build, targets = SEGMENTATION_NETS[cfg.model.backbone]
    torch.manual_seed(cfg.train.seed)
    net, _, _, encoder_prefix = build(cfg)
    lora = dict(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                target_modules=cfg.model.target_modules or targets)
    net = get_peft_model(net, LoraConfig(**lora), adapter_name="global")
    net.add_adapter("personal", LoraConfig(**lora))
    net.base_model.set_adapter(["global", "personal"])  # both active in one forward (LoraModel takes a list)
    for name, param in net.base_model.model.named_parameters():
        param.requires_grad_(".lora_" in name or not name.startswith(encoder_prefix))
    return net


def _lora_layers(net: torch.nn.Module):
    return [(n, m) for n, m in net.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and len(m.lora_A)]


def bare_seg_steps(net: torch.nn.Module, dataset, cfg: FedOpalConfig, steps: int,
                   device: torch.device | None = None) -> float:
    """Images/s of a plain loop over `net` (bare_seg_net): monai DiceCELoss (as the site: one-hot masks, softmax) +
    lambda x the spec's orthogonality (fedopal_w's weight loss, fedopal_r's representation loss, on peft's layers),
    AdamW on the trainable tensors, autocast in train.precision; no accumulation, schedule or bookkeeping. The batches
    are the site's timed round's (site_steps): the first `steps` batches of round 0, in the trainer's seeded order and
    per-pass augmentation seeds; two batches of it first, untimed (warm-up). On a GPU the clock stops after the
    last kernel."""
    from monai.losses import DiceCELoss

    device = device or resolve_device(cfg.train.device)
    net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scaler = grad_scaler(device, cfg.train.precision)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    regularizer = get_method(cfg.train.method, cfg.model.head).regularizer if cfg.train.orth_lambda > 0 else "none"
    layers = _lora_layers(net)
    rep = RepresentationOrthogonality(layers) if regularizer == "representation" else nullcontext()
    round_seed = cfg.train.seed * 100003  # SiteTrainer's round 0

    def run(count: int) -> int:
        done = images = passes = 0
        while done < count:
            dataset.augment_seed = round_seed * 1000 + passes
            for batch in loader(dataset, cfg.data.batch_size, shuffle=True, seed=round_seed,
                                num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda"):
                x = batch["image"].to(device, non_blocking=True)
                mask = batch["mask"].to(device, non_blocking=True)
                with autocast(device, cfg.train.precision):
                    logits = net(x)
                loss = loss_fn(logits.float(), mask)
                if regularizer == "weight":
                    loss = loss + cfg.train.orth_lambda * weight_orthogonality(layers, cfg.train.orth_on,
                                                                              cfg.train.orth_normalize)
                elif regularizer == "representation":
                    loss = loss + cfg.train.orth_lambda * rep.loss()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                images += len(x)
                done += 1
                if done >= count:
                    break
            passes += 1
        return images

    net.train()
    with rep:
        run(2)
        _synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        images = run(steps)
        _synchronize(device)
    return _timed(images, start, cpu)


def _seg_datasets(cfg: FedOpalConfig, site: str) -> dict:
    """The site's datasets without building FedOPAL's model: a MONAI segmentation network takes data.in_channels
    and no normalization of its own (backbones._segmentation_net), so the pipeline is the site's."""
    samples = check_site(cfg, site)
    return build_datasets(cfg.data.for_site(site), samples, cfg.data.in_channels, None, site_manifest_path(cfg, site),
                          cfg.train.seed)


def bare_seg_loop(cfg: FedOpalConfig, site: str, steps: int) -> float:
    return bare_seg_steps(bare_seg_net(cfg), _seg_datasets(cfg, site)["train"], cfg, steps)


def trainable_counts(cfg: FedOpalConfig) -> dict:
    """Trainable parameters of the site's model and of the bare loop's network: the two loops train the same."""
    site = build_model(cfg, get_method(cfg.train.method, cfg.model.head), "site-1")
    bare = bare_seg_net(cfg)
    return {"site": sum(p.numel() for p in site.parameters() if p.requires_grad),
            "bare": sum(p.numel() for p in bare.parameters() if p.requires_grad)}


def segmentation_part(config_path: str, site: str, steps: int, repeats: int) -> dict:
    """(s): the site loop and the bare loop on `site`, each run in its own process (one thread), `repeats` times
    alternating which goes first; the fastest run of each counts, and the highest peak RSS. Each run also gives its
    images per CPU second (the process's CPU time over the timed steps): on cores other processes share, the wall
    clock of a run depends on them, its CPU time much less; cpu_ratio is the site / bare ratio of their medians."""
    cfg = load_config(config_path)
    counts = trainable_counts(cfg)
    if counts["site"] != counts["bare"]:
        raise RuntimeError(f"the bare loop would train {counts['bare']:,} parameters, the site {counts['site']:,}")
    n_train = sum(1 for s in check_site(cfg, site) if s.split == "train")
    runs: dict = {"site_loop": [], "bare_seg_loop": []}
    for repeat in range(repeats):
        order = ("bare_seg_loop", "site_loop") if repeat % 2 == 0 else ("site_loop", "bare_seg_loop")
        for loop in order:
            rate, rss, cpu_rate = _loop_in_process(config_path, {}, site, steps, loop)
            runs[loop].append((rate, rss, cpu_rate))
            print(f"  [{repeat + 1}/{repeats}] {loop:<14} {rate:8.1f} img/s ({cpu_rate:6.1f} per CPU s)  peak RSS "
                  f"{rss:7.1f} MB", flush=True)
    site_rate, bare_rate = (max(r[0] for r in runs[k]) for k in ("site_loop", "bare_seg_loop"))
    site_rss, bare_rss = (max(r[1] for r in runs[k]) for k in ("site_loop", "bare_seg_loop"))
    site_cpu, bare_cpu = (statistics.median(r[2] for r in runs[k]) for k in ("site_loop", "bare_seg_loop"))
    site_med, bare_med = (statistics.median(r[0] for r in runs[k]) for k in ("site_loop", "bare_seg_loop"))
    size, dims = cfg.data.roi_size or cfg.data.image_size, cfg.data.spatial_dims
    net = {"unetr": "UNETR", "swin_unetr": "SwinUNETR"}.get(cfg.model.backbone, cfg.model.backbone)
    volumes = {"site_voxels_per_s": round(site_rate * size ** 3), "bare_voxels_per_s": round(bare_rate * size ** 3)} \
        if dims == 3 else {}
    return {"model": f"MONAI {net} {dims}D at {size}{'²' if dims == 2 else '³'}, LoRA r={cfg.model.lora_rank} on the "
                     f"encoder, {cfg.train.method}, {cfg.train.precision}",
            "site": site, "train_images": n_train, "batch_size": cfg.data.batch_size, "steps": steps,
            "repeats": repeats, "trainable_params": counts["site"],
            "site_img_per_s": round(site_rate, 1), "bare_img_per_s": round(bare_rate, 1),
            "seg_loop_ratio": round(site_rate / bare_rate, 3),
            "overhead_pct": round(100 * (bare_rate / site_rate - 1), 1), **volumes,
            "site_img_per_s_median": round(site_med, 1), "bare_img_per_s_median": round(bare_med, 1),
            "site_img_per_cpu_s": round(site_cpu, 1), "bare_img_per_cpu_s": round(bare_cpu, 1),
            "cpu_ratio": round(site_cpu / bare_cpu, 3), "cpu_overhead_pct": round(100 * (bare_cpu / site_cpu - 1), 1),
            "site_peak_rss_mb": round(site_rss, 1), "bare_peak_rss_mb": round(bare_rss, 1),
            "peak_rss_ratio": round(site_rss / bare_rss, 3),
            "runs": {k: [{"img_per_s": round(r, 1), "peak_rss_mb": round(m, 1), "img_per_cpu_s": round(c, 1)}
                         for r, m, c in v] for k, v in runs.items()}}


def segmentation_table(seg: dict) -> str:
    ok = lambda good: "met" if good else "missed"  # noqa: E731
    return "\n".join([
        "| measure | value | target |", "|---|---|---|",
        f"| (s) `seg_loop_ratio`: site loop / bare MONAI + peft loop ({seg['model']}, {seg['site']}, batch "
        f"{seg['batch_size']}, best of {seg['repeats']}) | {seg['seg_loop_ratio']} ({seg['site_img_per_s']} vs "
        f"{seg['bare_img_per_s']} img/s; "
        f"overhead {seg['overhead_pct']:+.1f} %) | >= 0.9 ({ok(seg['seg_loop_ratio'] >= 0.9)}) |",
        f"| (s) the same per CPU second, median of {seg['repeats']} (`cpu_ratio`) | {seg['cpu_ratio']} "
        f"({seg['site_img_per_cpu_s']} vs "
        f"{seg['bare_img_per_cpu_s']} img/CPU s; overhead {seg['cpu_overhead_pct']:+.1f} %) | |",
        f"| (s) peak RSS: the site loop's process / the bare loop's | {seg['site_peak_rss_mb']} / "
        f"{seg['bare_peak_rss_mb']} MB ({seg['peak_rss_ratio']}) | <= 1.3 ({ok(seg['peak_rss_ratio'] <= 1.3)}) |"])


PARTS = ("loop", "simulator", "vit_s", "scaling", "method_cost", "segmentation")
CLASSIFICATION_PARTS = PARTS[:-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="app_configs/demo.yaml")
    p.add_argument("--quick", action="store_true", help="fewer steps and site counts (a smoke run)")
    p.add_argument("--out", default="results/perf")
    p.add_argument("--workspace", default="workspace/perf")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                   help="what to measure (default: every part that applies to the config's data.task)")
    args = p.parse_args(argv)
    os.environ.setdefault("FEDOPAL_HOME", os.getcwd())
    torch.set_num_threads(1)
    steps = 6 if args.quick else 20
    if load_config(args.config).data.task == "segmentation":
        return segmentation_main(args, steps)
    parts = set(args.parts or CLASSIFICATION_PARTS)
    if "segmentation" in parts:
        p.error(f"--parts segmentation needs a segmentation config (data.task: segmentation), e.g. "
                f"app_configs/demo_seg.yaml; {args.config} is classification")
    base = load_config(args.config, {"train.method": "fedopal_w"})
    results: dict = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                                f"torch {torch.__version__}, 1 thread per site"}

    if "loop" in parts:
        print("(a) training loop throughput, EfficientNet-Lite0 + dual LoRA, fedopal_w:", flush=True)
        bare = bare_loop(base, "site-1", steps)
        site = site_loop(base, "site-1", steps)
        results["bare_images_per_s"], results["site_images_per_s"] = round(bare, 1), round(site, 1)
        results["loop_ratio"] = round(site / bare, 3)
        print(f"  bare {bare:.1f} img/s, site loop {site:.1f} img/s, ratio {site / bare:.3f}", flush=True)
    if "simulator" in parts:
        simulator_part(args, base, steps, results)
    if "vit_s" in parts:
        vit_s_part(args, results)
    if "scaling" in parts:
        print("(e) scaling at a fixed total of 800 training images (tiny ViT):", flush=True)
        counts = [2, 4] if args.quick else [2, 4, 8, 16]
        results["scaling"] = scaling(base, counts, 800, 2 if args.quick else 3, args.workspace)
    if "method_cost" in parts:
        print("(f) cost of each method, fused adapters and peft's path (64², batch 32, one thread):", flush=True)
        results["method_cost"] = method_cost(args.config, 4 if args.quick else 12, 1 if args.quick else 3)
        print("\n" + method_cost_table(results["method_cost"]), flush=True)
    print_targets(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({**results, "fedopal_version": fedopal.__version__}, f, indent=2)
    print(f"\nwritten: {os.path.join(args.out, 'summary.json')}")
    return 0


def segmentation_main(args, steps: int) -> int:
    """`fedopal perf --config <a segmentation config>`: (s) alone, written to <out>/summary_seg.json."""
    wrong = sorted(set(args.parts or ["segmentation"]) - {"segmentation"})
    if wrong:
        raise SystemExit(f"error: {args.config} is a segmentation config; --parts {' '.join(wrong)} measure the "
                         "classification demo (app_configs/demo.yaml). Fix: drop --parts, or pass --parts "
                         "segmentation.")
    results: dict = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                                f"torch {torch.__version__}, 1 thread per loop", "config": args.config}
    print(f"(s) segmentation training loop, {args.config}, site-1: site loop vs bare MONAI + peft loop:", flush=True)
    results["segmentation"] = segmentation_part(args.config, "site-1", steps, 1 if args.quick else 5)
    print("\n" + segmentation_table(results["segmentation"]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "summary_seg.json")
    with open(path, "w") as f:
        json.dump({**results, "fedopal_version": fedopal.__version__}, f, indent=2)
    print(f"\nwritten: {path}")
    return 0


def simulator_part(args, base: FedOpalConfig, steps: int, results: dict) -> None:
    print("(b)+(c)+(d) simulator, 2 sites:", flush=True)
    rounds = 2 if args.quick else 4
    sim_cfg = load_config(args.config, {"train.method": "fedopal_w", "train.num_rounds": rounds,
                                        "federation.num_sites": 2, "name": "perf_demo"})
    timed = simulate_timed(sim_cfg, args.workspace)
    bare_round = bare_round_s(sim_cfg, sim_cfg.federation.sites())
    results["startup_s"] = round(timed["startup_s"], 1)
    results["sim_round_s"], results["bare_round_s"] = round(timed["round_s"], 2), round(bare_round, 2)
    results["round_overhead_ratio"] = round(timed["round_s"] / bare_round, 3)
    comm = communication(sim_cfg, timed["bytes_received"])
    results["efficientnet"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in comm.items()}
    results["peak_rss_mb"] = round(max(timed["peak_rss"].values()) / 2**20, 1)
    results["bare_peak_rss_mb"] = round(max_rss_of_bare_loop(args.config, {"train.method": "fedopal_w"},
                                                             "site-1", steps), 1)
    print(f"  startup {timed['startup_s']:.1f} s; round {timed['round_s']:.2f} s vs bare {bare_round:.2f} s "
          f"(ratio {results['round_overhead_ratio']}); peak RSS {results['peak_rss_mb']} MB vs bare "
          f"{results['bare_peak_rss_mb']} MB", flush=True)


def vit_s_part(args, results: dict) -> None:
    print("(c) ViT-S (dim 384, depth 12, r=8):", flush=True)
    vit_cfg = load_config(args.config, {"train.method": "fedopal_w", "train.num_rounds": 1, "train.local_steps": 1,
                                        "federation.num_sites": 2, "name": "perf_vit_s", "model.backbone": "monai_vit",
                                        "model.pretrained": False, "model.vit": VIT_S, "data.image_size": 32})
    vit_timed = simulate_timed(vit_cfg, args.workspace)
    vit = communication(vit_cfg, vit_timed["bytes_received"])
    results["vit_s"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in vit.items()}
    results["bytes_fraction_float32"] = round(vit["bytes_fraction"], 5)
    fp16_cfg = config_from_dict({**vit_cfg.model_dump(mode="json"), "name": "perf_vit_s_fp16",
                                 "federation": {**vit_cfg.federation.model_dump(), "quantization": "float16"}})
    vit16 = communication(fp16_cfg, simulate_timed(fp16_cfg, args.workspace)["bytes_received"])
    results["vit_s_float16"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in vit16.items()}
    results["bytes_fraction"] = round(vit16["bytes_fraction"], 5)  # FedOPAL as shipped for ViT-S: float16
    print(f"  sent {vit['bytes_sent']:,.0f} B/round (float32), {vit16['bytes_sent']:,.0f} B (float16); "
          f"whole model {vit['whole_model']:,} B; fraction {vit['bytes_fraction']:.4f} / {vit16['bytes_fraction']:.4f}",
          flush=True)

def print_targets(results: dict) -> None:
    targets = {"loop_ratio": (">=", 0.9), "round_overhead_ratio": ("<=", 1.15), "bytes_fraction": ("<=", 0.02)}
    rows = []
    if "loop_ratio" in results:
        rows.append(("loop_ratio", results["loop_ratio"]))
    if "round_overhead_ratio" in results:
        rows += [("round_overhead_ratio", results["round_overhead_ratio"]), ("startup_s", results["startup_s"]),
                 ("sent / global-adapter floor (EfficientNet)", results["efficientnet"]["sent_over_floor"]),
                 ("peak_rss_mb / bare_peak_rss_mb", round(results["peak_rss_mb"] / results["bare_peak_rss_mb"], 3))]
    if "vit_s" in results:
        rows += [("bytes_fraction (ViT-S, float16 transfer)", results["bytes_fraction"]),
                 ("bytes_fraction (ViT-S, float32 transfer)", results["bytes_fraction_float32"]),
                 ("sent / global-adapter floor (ViT-S, float32)", results["vit_s"]["sent_over_floor"])]
    if "scaling" in results:
        rows.append(("scaling (sites: s/round)", results["scaling"]))
    print("\n| measure | value | target |\n|---|---|---|")
    for name, value in rows:
        key = name.split(" ")[0]
        target = None if "float32 transfer" in name else targets.get(key)
        mark = ""
        if target and isinstance(value, (int, float)):
            ok = value >= target[1] if target[0] == ">=" else value <= target[1]
            mark = f"{target[0]} {target[1]} ({'met' if ok else 'missed'})"
        elif "floor" in name:
            mark = "<= 1.05 (" + ("met" if value <= 1.05 else "missed") + ")"
        elif name.startswith("peak_rss"):
            mark = "<= 1.3 (" + ("met" if value <= 1.3 else "missed") + ")"
        print(f"| {name} | {value} | {mark} |")
    for name, value, mark in method_cost_targets(results.get("method_cost", {})):
        print(f"| {name} | {value} | {mark} |")


if __name__ == "__main__":
    sys.exit(main())
