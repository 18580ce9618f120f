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
"""

from __future__ import annotations

import argparse
import json
import os
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
from fedopal.site.data import build_datasets, loader, site_manifest_path
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
    start = time.perf_counter()
    trainer.train_round()
    _synchronize(device)
    return steps * cfg.data.batch_size * cfg.train.grad_accum_steps / (time.perf_counter() - start)


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
    code = ("import json, sys, torch; torch.set_num_threads(1); from fedopal.config import load_config; "
            "from fedopal.tools.perf import peak_rss_kb, site_loop; cfg = load_config(sys.argv[1], json.loads(sys.argv[2])); "
            "rate = site_loop(cfg, sys.argv[3], int(sys.argv[4])); print(rate, peak_rss_kb())")
    out = subprocess.run([sys.executable, "-c", code, config_path, json.dumps(overrides), site, str(steps)],
                         capture_output=True, text=True, check=True)
    rate, rss_kb = out.stdout.strip().splitlines()[-1].split()
    return float(rate), int(rss_kb) / 1024


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


PARTS = ("loop", "simulator", "vit_s", "scaling", "method_cost")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="app_configs/demo.yaml")
    p.add_argument("--quick", action="store_true", help="fewer steps and site counts (a smoke run)")
    p.add_argument("--out", default="results/perf")
    p.add_argument("--workspace", default="workspace/perf")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default all)")
    args = p.parse_args(argv)
    parts = set(args.parts)
    os.environ.setdefault("FEDOPAL_HOME", os.getcwd())
    torch.set_num_threads(1)
    steps = 6 if args.quick else 20
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
