"""A site's trained model as files anyone can load: safetensors + a JSON manifest (fedopal.site.predict, fedopal.site.latejoin).

Each site writes, inside its own state folder:

    export/best/<view>/         the round with the best *validation* balanced accuracy of that view (never test),
                                rewritten only when it changes
    export/last/personalized/   the last round: global + personal adapters + head (written at the last round)
    export/last/global_only/    the last round: the global adapter + head (dual-adapter methods only)

One view folder:

    manifest.json          format, view, site, method, round, metrics, config, backbone reference, file hashes
    adapters.safetensors   the LoRA tensors of the view's adapters and the head (full_ft: the backbone too)
    merged.safetensors     export.merged: the whole network with LoRA folded into the base weights; runs without peft

The backbone is referenced, not copied (family, pretrained/hf_model/checkpoint, a SHA-256 of its weights that loading
checks), except in the merged copy. A view folder is replaced as a whole: written under a temp name, then renamed,
so a reader or a crash sees the previous export or the new one, never a mix.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import replace

import torch
from torch import nn

from fedopal.model.backbones import build_backbone
from fedopal.config import HEADLINE, ConfigError, FedOpalConfig, config_with_overrides, job_dict
from fedopal.site.device import cpu_copy
from fedopal.specs.methods import MethodSpec, get_method, group_of

FORMAT = "fedopal-export/1"
EXPORT_DIR = "export"  # inside a site's state folder (site_state.SiteStore.folder)
MANIFEST = "manifest.json"
ADAPTERS = "adapters.safetensors"
MERGED = "merged.safetensors"
INSTANCE_BANK = "fedopal.instance_bank"  # FedDPA: training features that weight the personal adapter
def key_metric(task: str) -> str:
    """The protocol's selection metric, within a view: validation balanced accuracy, or Dice (segmentation)."""
    return "val/" + HEADLINE[task]


class ExportError(ValueError):
    """A missing, damaged or mismatched export; the message names the file and the fix."""


# -- what a view holds ----------------------------------------------------------------------------------------

def views_of(spec: MethodSpec) -> dict[str, tuple[str, ...]]:
    """The views a site evaluates, and exports: view name -> active adapters (as SiteTrainer.evaluate)."""
    views = {"personalized": spec.adapters}
    if "global" in spec.adapters and "personal" in spec.adapters:
        views["global_only"] = ("global",)
    return views


def view_state(model: nn.Module, adapters: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors a view adds to the reference backbone: its adapters' LoRA tensors (trained or frozen at the
    common init, as ffa_lora's A), the head, and the backbone itself if the method trains it."""
    groups = {f"{a}.{m}" for a in adapters for m in "AB"} | {"head"}
    if "backbone" in model.spec.trainable:
        groups.add("backbone")
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
            if group_of(k) in groups}


def merged_state(model: nn.Module, adapters: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The plain network (backbone with the view's adapters folded in, then the head), on a copy of the model."""
    twin = cpu_copy(model)  # merged on the CPU: a model training on a GPU is not copied there
    plain = twin.backbone.merge_and_unload(adapter_names=list(adapters)) if model.spec.adapters else twin.backbone
    state = {f"backbone.{k}": v for k, v in plain.state_dict().items()}
    state.update({f"head.{k}": v for k, v in twin.head.state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the frozen foundation model's tensors (names and bytes): loading checks it, so an adapter
    never lands silently on other weights (a changed checkpoint file, another wheel, another random init)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if group_of(key) == "backbone":
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_reference(cfg: FedOpalConfig, fingerprint: str | None) -> dict:
    return {"family": cfg.model.backbone, "pretrained": cfg.model.pretrained, "hf_model": cfg.model.hf_model,
            "checkpoint": cfg.model.checkpoint, "sha256": fingerprint}


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- writing --------------------------------------------------------------------------------------------------

def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": FORMAT})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_folder(build, target: str) -> None:
    """Write a folder through `build(tmp_folder)`, then swap it in for `target`.

    A directory cannot be renamed over a non-empty one, so the old folder steps aside first; a crash between the two
    renames leaves the complete old export under <target>.old-*, which the next write clears. If `build` fails,
    `target` is untouched.
    """
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(target)
    for stale in glob.glob(os.path.join(parent, f".{name}.tmp-*")) + glob.glob(os.path.join(parent, f".{name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        build(tmp)
        old = None
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_view(model: nn.Module, cfg: FedOpalConfig, view: str, adapters: tuple[str, ...], folder: str,
               round_num: int, metrics: dict, merged: bool, fingerprint: str | None, site: str | None = None,
               total_rounds: int | None = None, run_id: str | None = None, weighting=None) -> str:
    """One view of a model into `folder` (replaced atomically). `metrics` are SiteTrainer.evaluate's keys;
    `weighting`: FedDPA's train.InstanceWeighting, whose feature bank the personalized view needs."""
    spec = model.spec
    tensors = view_state(model, adapters)
    instance_weighted = spec.inference_weighting == "instance_similarity" and "personal" in adapters
    # FedDPA's bank holds one backbone embedding per training image: patient-derived data, exported only when
    # export.feature_bank says so. Without it the view weighs the personal adapter 1 for every input.
    weighted = instance_weighted and cfg.export.feature_bank
    if weighted:
        tensors[INSTANCE_BANK] = weighting.bank.detach().to("cpu", copy=True).contiguous()
    # FedDPA's per-instance personal weight cannot be folded into fixed weights: no merged copy for that view.
    merged = merged and not weighted
    backbone_in_file = "backbone" in spec.trainable
    manifest = {
        "format": FORMAT,
        "view": view,
        "adapters": list(adapters),
        "site": site,
        "method": spec.name,
        "head": spec.head,
        "shared_only": all(group_of(k) in spec.shared for k in tensors),
        "round": round_num + 1,  # counted from 1, as the tables and progress lines (0: before any training)
        "total_rounds": total_rounds,
        "run_id": run_id,
        "metrics": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{view}/")},
        "config": job_dict(cfg),
        "backbone": backbone_reference(cfg, None if backbone_in_file else fingerprint),
        "backbone_in_file": backbone_in_file,
        "inference_weighting": {"kind": spec.inference_weighting, "k": weighting.k} if weighted else None,
        "feature_bank": (f"exported: {len(weighting.bank)} backbone embeddings of this site's training images "
                         "(patient-derived data)" if weighted else
                         "not exported (export.feature_bank false): the personal adapter weighs 1 for every input, "
                         "where training evaluated it with FedDPA's instance-wise weighting" if instance_weighted
                         else None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {},
    }

    def build(tmp: str) -> None:
        files = {ADAPTERS: tensors}
        if merged:
            files[MERGED] = merged_state(model, adapters)
        for name, state in files.items():
            _save_tensors(state, os.path.join(tmp, name))
            manifest["files"][name] = _sha256_file(os.path.join(tmp, name))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    replace_folder(build, folder)
    return folder


def export_site_model(model: nn.Module, cfg: FedOpalConfig, folder: str, round_num: int, metrics: dict,
                      merged: bool | None = None, **details) -> dict[str, str]:
    """Every view of a site's model into folder/<view>/ (personalized; global_only for dual adapters).
    details: site, total_rounds, run_id, fingerprint, weighting (see write_view). Returns view -> folder."""
    merged = cfg.export.merged if merged is None else merged
    fingerprint = details.pop("fingerprint", None)
    if fingerprint is None and "backbone" not in model.spec.trainable:
        fingerprint = backbone_fingerprint(model)
    return {view: write_view(model, cfg, view, adapters, os.path.join(folder, view), round_num, metrics, merged,
                             fingerprint, **details)
            for view, adapters in views_of(model.spec).items()}


def _read_manifest_if_any(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class SiteExporter:
    """What the site script calls each round: export/best/<view> when that view's validation balanced accuracy
    beats the best of this run (ties keep the earlier round, as report.py does), export/last/<view> at the last
    round."""

    def __init__(self, model: nn.Module, cfg: FedOpalConfig, site_folder: str, site: str, train_set=None,
                 run_id: str | None = None, weighting=None, first_eligible_round: int = 1):
        """weighting: a callable returning the trainer's InstanceWeighting (SiteTrainer.instance_weighting), so the
        export stores the very bank the site evaluated with; without it, one is built from `train_set`.
        first_eligible_round (from 1, as site.selection): rounds before it never become the best export; a late
        joiner's evaluation before training (round 0) never does."""
        self.model, self.cfg, self.site, self.run_id = model, cfg, site, run_id
        self.first_eligible_round = first_eligible_round
        self.root = os.path.join(site_folder, EXPORT_DIR)
        self.train_set = train_set
        self._trainer_weighting = weighting
        # The reference backbone as built, before any training (full_ft trains it, and then ships it in the file).
        self.fingerprint = backbone_fingerprint(model)
        self._bank = None

    def _weighting(self):
        if self.model.spec.inference_weighting != "instance_similarity" or not self.cfg.export.feature_bank:
            return None
        if self._trainer_weighting is not None:
            return self._trainer_weighting()
        if self._bank is None:  # frozen-backbone features of the training split: the same every round
            from fedopal.site.train import InstanceWeighting  # the exact weighting the trainer evaluated with

            self._bank = InstanceWeighting(self.model, self.train_set, self.cfg.data.batch_size)
        return self._bank

    def write(self, round_num: int, metrics: dict, total_rounds: int | None = None) -> dict[str, str]:
        """export/best/<view> when that view's validation score improves, export/last/<view> at the last round
        (every round when total_rounds is unknown): a short GPU round is not spent writing views that the next
        round replaces. Returns view -> the folder written for it this round (last before best), if any."""
        fingerprint, weighting = self.fingerprint, self._weighting()
        details = dict(site=self.site, total_rounds=total_rounds, run_id=self.run_id, weighting=weighting)
        written = {}
        for view, adapters in views_of(self.model.spec).items():
            best_folder = os.path.join(self.root, "best", view)
            if round_num + 1 >= self.first_eligible_round and self._improves(  # round_num is FLARE's, from 0
                    _read_manifest_if_any(best_folder), round_num, metrics.get(f"{view}/{key_metric(self.cfg.data.task)}")):
                written[view] = write_view(self.model, self.cfg, view, adapters, best_folder, round_num, metrics,
                                           self.cfg.export.merged, fingerprint, **details)
        if total_rounds is None or round_num >= total_rounds - 1:
            written = export_site_model(self.model, self.cfg, os.path.join(self.root, "last"), round_num, metrics,
                                        fingerprint=fingerprint, **details)
        return written

    def _improves(self, best: dict | None, round_num: int, score: float | None) -> bool:
        if best is None or best.get("run_id") != self.run_id or best.get("round", -1) >= round_num + 1:
            return True  # nothing yet, or left by an earlier run (the simulator reuses its job id)
        best_score = best.get("metrics", {}).get(key_metric(self.cfg.data.task), math.nan)
        if score is None or math.isnan(score):
            return False
        return math.isnan(best_score) or score > best_score


# -- reading --------------------------------------------------------------------------------------------------

class MergedModel(nn.Module):
    """The merged export rebuilt without peft: the backbone family's plain network + the head."""

    def __init__(self, backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone.module
        self.head = head
        self.in_channels = backbone.in_channels
        self.normalization = backbone.normalization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class InstanceWeightedModel(nn.Module):
    """FedDPA's personalized view: the personal adapter weighted per input by its similarity to the training bank."""

    def __init__(self, model: nn.Module, weighting):
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.in_channels = model.in_channels
        self.normalization = model.normalization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.model.personal_scaled(self.weighting.weights(x)):
            return self.model(x)


def read_manifest(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise ExportError(f"{folder}: export folder not found. Fix: pass a view folder written by a FedOPAL job, "
                          f"e.g. <site state>/{EXPORT_DIR}/best/personalized.")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        inside = sorted(os.path.relpath(os.path.dirname(p), folder)
                        for p in glob.glob(os.path.join(folder, "**", MANIFEST), recursive=True))
        hint = f"; views inside: {', '.join(inside[:4])}" if inside else ""
        raise ExportError(f"{folder}: no {MANIFEST}, so not an export view folder{hint}. "
                          "Fix: pass one view folder, e.g. .../export/best/personalized.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError as err:
        raise ExportError(f"{path}: not valid JSON ({err}). Fix: re-export the model; the file is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{path}: format {got!r} is not {FORMAT!r}. Fix: export it with this FedOPAL version.")
    return manifest


def read_tensors(folder: str, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    """A safetensors file of the view, checked against the hash the manifest recorded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        fix = ("set export.merged: true in the job config (or call export_site_model(..., merged=True)), or use "
               "the adapter model" if name == MERGED else "re-export the model")
        raise ExportError(f"{path}: file missing. Fix: {fix}.")
    expected = manifest.get("files", {}).get(name)
    if expected and _sha256_file(path) != expected:
        raise ExportError(f"{path}: corrupt (SHA-256 differs from {MANIFEST}). Fix: copy the export again, "
                          "or re-export it from the site's state folder.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err}). Fix: copy the export again, "
                          "or re-export it from the site's state folder.") from None


def export_config(folder: str, manifest: dict, overrides: dict | None = None) -> FedOpalConfig:
    try:
        return config_with_overrides(manifest.get("config") or {}, overrides, os.path.join(folder, MANIFEST))
    except ConfigError as err:
        raise ExportError(str(err)) from None


def _check_fits(path: str, own: dict, tensors: dict) -> None:
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{what}: {keys[:3]}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ExportError(f"{path}: does not fit the model its manifest describes ({'; '.join(parts)}). "
                          "Fix: re-export the model; do not mix files of different exports.")


def load_exported(folder: str, merged: bool = False, overrides: dict | None = None
                  ) -> tuple[nn.Module, FedOpalConfig, dict]:
    """(model in eval mode, config, manifest). The model has `in_channels` and `normalization` for the data
    pipeline. merged=True rebuilds the plain network from merged.safetensors without importing peft.
    overrides: dotted config keys, e.g. {"model.checkpoint": "/models/vit.pt"} where the backbone moved."""
    manifest = read_manifest(folder)
    cfg = export_config(folder, manifest, overrides)
    plain_cfg = cfg.model_copy(deep=True)  # the file holds every backbone weight: build the architecture only
    plain_cfg.model.pretrained, plain_cfg.model.checkpoint = False, None
    if merged:
        tensors = read_tensors(folder, MERGED, manifest)
        torch.manual_seed(cfg.train.seed)
        backbone = build_backbone(plain_cfg)
        head = backbone.decoder if backbone.decoder is not None else nn.Linear(backbone.feature_dim,
                                                                                cfg.data.num_classes)
        model = MergedModel(backbone, head)
        _check_fits(os.path.join(folder, MERGED), model.state_dict(), tensors)
        model.load_state_dict(tensors)
        return model.eval(), cfg, manifest

    from fedopal.model.adapters import build_model  # peft only for the adapter model

    tensors = read_tensors(folder, ADAPTERS, manifest)
    bank = tensors.pop(INSTANCE_BANK, None)
    try:
        spec = replace(get_method(manifest["method"], cfg.model.head), adapters=tuple(manifest["adapters"]))
    except (KeyError, TypeError) as err:
        raise ExportError(f"{os.path.join(folder, MANIFEST)}: unknown method or adapters ({err}). "
                          "Fix: export it with this FedOPAL version.") from None
    model = build_model(plain_cfg if manifest.get("backbone_in_file") else cfg, spec)
    expected = manifest.get("backbone", {}).get("sha256")
    if expected and backbone_fingerprint(model) != expected:
        ref = manifest["backbone"]
        raise ExportError(
            f"{folder}: the backbone built from the reference ({ref['family']}, pretrained={ref['pretrained']}, "
            f"hf_model={ref['hf_model']}, checkpoint={ref['checkpoint']}, seed={cfg.train.seed}) differs from the "
            "one this model was trained on. Fix: point model.hf_model / model.checkpoint at the original weights "
            "(--set), or use the merged copy.")
    own = view_state(model, spec.adapters)
    _check_fits(os.path.join(folder, ADAPTERS), own, tensors)
    with torch.no_grad():
        state = model.state_dict()
        for k, v in tensors.items():
            state[k].copy_(v)
    model.eval()
    weighting = manifest.get("inference_weighting")
    if weighting and bank is not None:
        from fedopal.site.train import InstanceWeighting

        stored = InstanceWeighting.__new__(InstanceWeighting)  # the trainer's weighting, with the stored bank
        stored.model, stored.bank, stored.k = model, bank, int(weighting["k"])
        model = InstanceWeightedModel(model, stored).eval()
    return model, cfg, manifest
