"""`make gpu-check`: FedOPAL's training loop on a CUDA GPU, held to the bare loop. Nothing is downloaded.

    fedopal gpu-check [--hf-model DIR] [--out results/gpu]
    fedopal gpu-check --smoke     # the same code on the CPU with a tiny ViT, in seconds (make test runs it)

(a) a bare torch + peft loop (perf.bare_steps: the same model, loss, batches and autocast, and nothing else) and
(b) the production site loop (SiteTrainer.train_round, exactly as the site script runs it), on ViT-B/16 at 224²,
    bf16 autocast, LoRA r=8 on every linear layer, batches 64 and 256, for fedavg_lora, dual_lora, fedopal_w and
    fedopal_r: images/s, the ratio (b)/(a) (target >= 0.9), and peak GPU memory; and (b) again on peft's own
    forward (model.fused_adapters: false), the fused path's gain (README, Performance);
(c) a 2-site, 2-round FLARE simulator job on the GPU (ViT-B/16 at 224² on the bundled PneumoniaMNIST), with the
    device line each site logged;
(d) 3D segmentation: MONAI UNETR (ViT-B encoder, hidden 768, feature size 16) and SwinUNETR (feature size 48, depths
    2-2-2-2) on 96³ patches, batch 4, fedopal_w, LoRA r=8 on the encoder, the decoder the trained head, bf16 autocast:
    (a) a bare MONAI + peft loop (perf.bare_seg_steps: the same network and initial weights, peft's two adapters on
    the same modules, monai DiceCELoss, AdamW) vs (b) the site loop, in voxels/s (target (b)/(a) >= 0.9, counted in
    min_ratio) and peak GPU memory. Smoke: UNETR with a tiny ViT at 16³, batch 2 (fp32 on a CPU).
Prints a table and writes <out>/summary.json. The weights are random-init (a transformers ViTConfig, i.e. ViT-B/16,
written to a temp folder) unless --hf-model names a local folder (from_pretrained). The images of (a) and (b) are
random tensors held in memory, so the two loops are measured on compute alone; (c) reads real files; (d)'s volumes
are random tensors with a random ball as the mask, its networks random-init.

On a CUDA machine without the pinned packages and without network (the H200 used for checks has Python 3.12 and
torch, but not nvflare, monai, nibabel, pydantic, pyhocon or cryptography): run `make gpu-wheels` on a machine with
network, copy the .whl folder over, and `make gpu-check` installs those wheels under /tmp/fedopal-site (pip
--no-index --no-deps) and runs this with the machine's own torch (README, "GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

import fedopal
from fedopal.model.adapters import build_model
from fedopal.config import config_with_overrides
from fedopal.site.device import describe, resolve_device
from fedopal.specs.methods import get_method
from fedopal.tools.perf import bare_seg_net, bare_seg_steps, bare_steps, site_steps

METHODS = ("fedavg_lora", "dual_lora", "fedopal_w", "fedopal_r")
TARGET_RATIO = 0.9
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 32, "patch_size": 8}
# (d): the networks of 3D segmentation, as published (UNETR: Hatamizadeh et al., WACV 2022, ViT-B; SwinUNETR:
# Hatamizadeh et al., BrainLes 2021), and the smoke run's tiny UNETR (MONAI's UNETR always has 12 blocks)
SEG3D_MODELS = {"unetr": {"model.vit": {"hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
                          "model.decoder_channels": 16},
                "swin_unetr": {"model.swin": {"feature_size": 48, "depths": [2, 2, 2, 2],
                                              "num_heads": [3, 6, 12, 24]}}}
SEG3D_SMOKE = {"unetr": {"model.vit": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 3},
                         "model.decoder_channels": 8},
               "swin_unetr": {"model.swin": {"feature_size": 12, "depths": [1, 1, 1, 1]}}}  # needs 64³: not run
SEG3D_SMOKE_RUN = ["unetr"]  # SwinUNETR's smallest input (64³) takes a minute on a CPU


class SyntheticImages(torch.utils.data.Dataset):
    """`n` random images held in memory, labelled 0/1 alternately: the data of (a) and (b)."""

    def __init__(self, n: int, size: int, channels: int = 3, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, channels, size, size, generator=gen)
        self.labels = torch.arange(n) % 2
        self.data = [{"label": int(y)} for y in self.labels]  # what SiteTrainer reads for class weights

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


class SyntheticVolumes(torch.utils.data.Dataset):
    """`n` random single-channel volumes of `size`³ held in memory, each with a random ball as its foreground mask:
    the data of (d), as SiteTrainer reads a segmentation split (image, mask, label 0)."""

    def __init__(self, n: int, size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, size, size, size, generator=gen)
        axis = torch.arange(size, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
        centres = size * (0.3 + 0.4 * torch.rand(n, 3, generator=gen))
        radii = size * (0.1 + 0.2 * torch.rand(n, generator=gen))
        self.masks = torch.stack([((grid - c.view(3, 1, 1, 1)).pow(2).sum(0) <= r ** 2).float()[None]
                                  for c, r in zip(centres, radii)])
        self.data = [{"label": 0} for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "mask": self.masks[index], "label": 0}


def seg3d_config(backbone: str, size: int, batch: int, device: str, precision: str, smoke: bool):
    raw = {"name": "gpucheck_seg3d",
           "data": {"task": "segmentation", "spatial_dims": 3, "image_size": size, "in_channels": 1,
                    "class_names": ["background", "foreground"], "batch_size": batch, "augment": False},
           "model": {"backbone": backbone, "pretrained": False, "lora_rank": 8, "lora_alpha": 16, "head": "personal"},
           "train": {"method": "fedopal_w", "device": device, "precision": precision, "lr": 1e-4, "orth_lambda": 0.1}}
    return config_with_overrides(raw, (SEG3D_SMOKE if smoke else SEG3D_MODELS)[backbone], source="gpucheck")


def measure_seg(loop, cfg, data: SyntheticVolumes, steps: int, device: torch.device) -> dict:
    """(d) one loop on a freshly built network: images/s and peak GPU memory (GiB; None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if loop is bare_seg_steps:
        net = bare_seg_net(cfg)
        rate = bare_seg_steps(net, data, cfg, steps, device)
    else:
        net = build_model(cfg, get_method(cfg.train.method, cfg.model.head), site_name="site-1")
        rate = site_steps(net, {"train": data}, cfg, steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del net
    return {"img_per_s": rate, "peak_gib": round(peak, 1) if peak is not None else None}


def seg3d_loops(backbones: list[str], size: int, batch: int, steps: int, device: torch.device, precision: str,
                smoke: bool) -> dict:
    """(d): (a) the bare MONAI + peft loop and (b) the site loop for each network, alternating which runs first."""
    data = SyntheticVolumes(batch * 2, size)
    voxels = size ** 3
    results: dict = {}
    for i, backbone in enumerate(backbones):
        cfg = seg3d_config(backbone, size, batch, str(device), precision, smoke)
        order = (bare_seg_steps, site_steps) if i % 2 == 0 else (site_steps, bare_seg_steps)
        got = {loop.__name__: measure_seg(loop, cfg, data, steps, device) for loop in order}
        bare, site = got["bare_seg_steps"], got["site_steps"]
        row = {"patch": f"{size}³", "batch": batch,
               "bare_voxels_per_s": round(bare["img_per_s"] * voxels),
               "site_voxels_per_s": round(site["img_per_s"] * voxels),
               "bare_img_per_s": round(bare["img_per_s"], 3), "site_img_per_s": round(site["img_per_s"], 3),
               "ratio": round(site["img_per_s"] / bare["img_per_s"], 3),
               "bare_peak_gib": bare["peak_gib"], "site_peak_gib": site["peak_gib"]}
        results[backbone] = row
        print(f"  {backbone:<10} {row['patch']} batch {batch}: bare {row['bare_voxels_per_s'] / 1e6:,.2f} Mvox/s, site "
              f"{row['site_voxels_per_s'] / 1e6:,.2f} Mvox/s, ratio {row['ratio']:.3f}, peak {row['bare_peak_gib']} / "
              f"{row['site_peak_gib']} GiB", flush=True)
    return results


def seg3d_table(results: dict) -> str:
    lines = ["| network | patch | batch | (a) bare Mvoxels/s | (b) site Mvoxels/s | (b)/(a) | peak GiB (a) | "
             "peak GiB (b) |", "|---|---|---|---|---|---|---|---|"]
    for backbone, r in results.items():
        mark = "" if r["ratio"] >= TARGET_RATIO else " (below 0.9)"
        lines.append(f"| {backbone} | {r['patch']} | {r['batch']} | {r['bare_voxels_per_s'] / 1e6:,.2f} | "
                     f"{r['site_voxels_per_s'] / 1e6:,.2f} | {r['ratio']:.3f}{mark} | {r['bare_peak_gib'] or 'n/a'} | "
                     f"{r['site_peak_gib'] or 'n/a'} |")
    return "\n".join(lines)


def vit_folder(hf_model: str | None, smoke: bool, tmp: str) -> tuple[str, bool]:
    """(a transformers model folder, whether it holds weights): the given one, or a ViTConfig written to `tmp`."""
    if hf_model:
        return hf_model, True
    from transformers import ViTConfig

    ViTConfig(**(TINY_VIT if smoke else {})).save_pretrained(tmp)
    return tmp, False


def config(method: str, folder: str, pretrained: bool, image_size: int, batch: int, device: str, precision: str,
           overrides: dict | None = None):
    raw = {"name": "gpucheck", "data": {"image_size": image_size, "in_channels": 3, "num_classes": 2,
                                        "batch_size": batch, "augment": False},
           "model": {"backbone": "hf", "hf_model": folder, "pretrained": pretrained, "lora_rank": 8,
                     "lora_alpha": 16, "head": "personal"},
           "train": {"method": method, "device": device, "precision": precision, "lr": 1e-4, "orth_lambda": 0.1}}
    return config_with_overrides(raw, overrides, source="gpucheck")


def measure(loop, cfg, data: SyntheticImages, steps: int, device: torch.device) -> dict:
    """One loop on a freshly built model: images/s and peak GPU memory (GiB; None on the CPU)."""
    model = build_model(cfg, get_method(cfg.train.method, cfg.model.head), site_name="site-1")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if loop is bare_steps:
        rate = bare_steps(model, data, cfg, steps, device)
    else:
        rate = site_steps(model, {"train": data}, cfg, steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model
    return {"img_per_s": round(rate, 1), "peak_gib": round(peak, 1) if peak is not None else None}


def loops(folder: str, pretrained: bool, image_size: int, batches: list[int], steps: int, device: torch.device,
          precision: str, methods=METHODS) -> dict:
    """(a) and (b) for every method and batch size, alternating which loop runs first."""
    results: dict = {}
    n = max(batches) * 2
    data = SyntheticImages(n, image_size)
    for method in methods:
        for batch in batches:
            cfg = config(method, folder, pretrained, image_size, batch, str(device), precision)
            order = (bare_steps, site_steps) if len(results) % 2 == 0 else (site_steps, bare_steps)
            got = {loop.__name__: measure(loop, cfg, data, steps, device) for loop in order}
            bare, site = got["bare_steps"], got["site_steps"]
            # the site loop on peft's own forward (model.fused_adapters: false), for the fused path's gain
            unfused = measure(site_steps, config(method, folder, pretrained, image_size, batch, str(device), precision,
                                                 {"model.fused_adapters": False}), data, steps, device)
            row = {"bare_img_per_s": bare["img_per_s"], "site_img_per_s": site["img_per_s"],
                   "ratio": round(site["img_per_s"] / bare["img_per_s"], 3),
                   "bare_peak_gib": bare["peak_gib"], "site_peak_gib": site["peak_gib"],
                   "site_unfused_img_per_s": unfused["img_per_s"], "site_unfused_peak_gib": unfused["peak_gib"]}
            results.setdefault(method, {})[str(batch)] = row
            print(f"  {method:<12} batch {batch:>4}: bare {row['bare_img_per_s']:>8.1f} img/s, site "
                  f"{row['site_img_per_s']:>8.1f} img/s, ratio {row['ratio']:.3f}, peak {row['site_peak_gib']} GiB; "
                  f"peft path {row['site_unfused_img_per_s']:.1f} img/s, {row['site_unfused_peak_gib']} GiB",
                  flush=True)
    return results


def simulator_job(folder: str, pretrained: bool, image_size: int, device: torch.device, precision: str,
                  smoke: bool, workspace: str) -> dict:
    """(c): 2 sites x 2 rounds of fedopal_w through the FLARE simulator, both sites on this machine's first GPU."""
    from fedopal.tools.job import preflight, simulate
    from fedopal.tools.prepare import build_federation
    from fedopal.tools.report import collect_site_records

    root = os.path.join(workspace, "federation")
    npz = os.path.join(os.environ.get("FEDOPAL_HOME", os.getcwd()), "data", "medmnist", "pneumoniamnist.npz")
    per_site = (16, 8, 8) if smoke else (128, 32, 64)
    build_federation(npz, root, num_sites=2, seed=0, train_per_site=per_site[0], val_per_site=per_site[1],
                     test_per_site=per_site[2], min_test_per_class=2, min_val_per_class=2)
    cfg = config("fedopal_w", folder, pretrained, image_size, 8 if smoke else 32, device.type, precision,
                 {"name": "gpucheck_sim", "data.root": os.path.abspath(root), "data.augment": True,
                  "data.in_channels": 1,
                  "data.num_workers": 0 if smoke else 2, "train.num_rounds": 2, "train.local_steps": 1 if smoke else 4,
                  "federation.num_sites": 2})
    preflight(cfg)
    start = time.time()
    job_ws = simulate(cfg, os.path.join(workspace, "sim"), gpus="0" if device.type == "cuda" else None)
    wall = time.time() - start
    records = collect_site_records(job_ws)
    sites = {site: {"device": rs[0].get("device"), "round_wall_s": [r["wall_s"] for r in rs],
                    "test_balanced_accuracy": round(rs[-1]["personalized/test/balanced_accuracy"], 3)}
             for site, rs in sorted(records.items())}
    for site, info in sites.items():
        print(f"  {site}: trained on {info['device']}; round wall times {info['round_wall_s']} s; test bal. acc. "
              f"{info['test_balanced_accuracy']}", flush=True)
    return {"wall_s": round(wall, 1), "rounds": 2, "sites": sites}


def table(results: dict) -> str:
    lines = ["| method | batch | (a) bare img/s | (b) site img/s | (b)/(a) | peak GiB (a) | peak GiB (b) | "
             "(b) on peft's path img/s | its peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for method, by_batch in results.items():
        for batch, r in by_batch.items():
            mark = "" if r["ratio"] >= TARGET_RATIO else " (below 0.9)"
            lines.append(f"| {method} | {batch} | {r['bare_img_per_s']:,.1f} | {r['site_img_per_s']:,.1f} | "
                         f"{r['ratio']:.3f}{mark} | {r['bare_peak_gib'] or 'n/a'} | {r['site_peak_gib'] or 'n/a'} | "
                         f"{r['site_unfused_img_per_s']:,.1f} | {r['site_unfused_peak_gib'] or 'n/a'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-model", help="a local transformers ViT/DINOv2 folder (default: random-init ViT-B/16)")
    p.add_argument("--smoke", action="store_true", help="tiny ViT at 32 px on whatever device there is, 2 steps")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 64 256 (smoke: 4 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 15; smoke 2)")
    p.add_argument("--device", default=None, help="default cuda (smoke: auto)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--skip-simulator", action="store_true", help="leave out (c)")
    p.add_argument("--seg3d", nargs="*", choices=sorted(SEG3D_MODELS), default=None,
                   help="(d)'s networks (default unetr swin_unetr; smoke: unetr); none: leave out (d)")
    p.add_argument("--seg3d-size", type=int, default=None, help="(d)'s patch edge (default 96; smoke 16)")
    p.add_argument("--seg3d-batch", type=int, default=None, help="(d)'s batch (default 4; smoke 2)")
    p.add_argument("--out", default="results/gpu")
    args = p.parse_args(argv)
    os.environ.setdefault("FEDOPAL_HOME", os.getcwd())
    device = resolve_device(args.device or ("auto" if args.smoke else "cuda"))
    batches = args.batches or ([4, 8] if args.smoke else [64, 256])
    steps = args.steps or (2 if args.smoke else 15)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.time()
    summary = {"machine": f"{platform.node()}: {describe(device, args.precision)}; torch {torch.__version__}, "
                          f"Python {platform.python_version()}", "batches": batches, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        folder, pretrained = vit_folder(args.hf_model, args.smoke, os.path.join(tmp, "vit"))
        image_size = TINY_VIT["image_size"] if args.smoke else 224
        name = "tiny ViT" if args.smoke else (args.hf_model or "random-init ViT-B/16")
        summary["model"] = f"{name} at {image_size}², LoRA r=8 on every linear layer, {args.precision}"
        print(f"GPU check on {summary['machine']}\n{summary['model']}\n(a) bare loop vs (b) site loop:", flush=True)
        summary["loops"] = loops(folder, pretrained, image_size, batches, steps, device, args.precision)
        if not args.skip_simulator:
            print("(c) 2 sites x 2 rounds in the FLARE simulator:", flush=True)
            summary["simulator"] = simulator_job(folder, pretrained, image_size, device, args.precision,
                                                 args.smoke, os.path.join(tmp, "work"))
    seg_nets = args.seg3d if args.seg3d is not None else (SEG3D_SMOKE_RUN if args.smoke else list(SEG3D_MODELS))
    if seg_nets:
        size = args.seg3d_size or (16 if args.smoke else 96)
        batch = args.seg3d_batch or (2 if args.smoke else 4)
        # the CPU has no fast bf16 3D convolution (4x slower than fp32 at 16³): the smoke run's (d) is fp32 there
        precision = "fp32" if args.smoke and device.type == "cpu" else args.precision
        summary["seg3d_model"] = (f"3D segmentation at {size}³, batch {batch}, fedopal_w, LoRA r=8 on the encoder, "
                                  f"decoder trained, DiceCE, {precision}" + (" (tiny UNETR)" if args.smoke else ""))
        print(f"(d) {summary['seg3d_model']}: bare MONAI + peft loop vs site loop:", flush=True)
        summary["seg3d"] = seg3d_loops(seg_nets, size, batch, steps, device, precision, args.smoke)
    ratios = [r["ratio"] for by_batch in summary["loops"].values() for r in by_batch.values()]
    ratios += [r["ratio"] for r in summary.get("seg3d", {}).values()]
    summary["min_ratio"] = min(ratios)
    summary["target_met"] = summary["min_ratio"] >= TARGET_RATIO
    summary["wall_s"] = round(time.time() - start, 1)
    summary["fedopal_version"] = fedopal.__version__
    print("\n" + table(summary["loops"]))
    if summary.get("seg3d"):
        print("\n" + seg3d_table(summary["seg3d"]))
    print(f"\nlowest (b)/(a): {summary['min_ratio']:.3f} (target >= {TARGET_RATIO}: "
          f"{'met' if summary['target_met'] else 'missed'}); wall time {summary['wall_s']:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"written: {os.path.join(args.out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
