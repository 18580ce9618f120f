"""Build the FLARE job from a config: export it (no-code or code-shipping), or run it in the simulator.

    fedopal job --config app_configs/demo.yaml --export jobs/                  # both flavors of the job
    fedopal job --config app_configs/demo.yaml --sites hospital-a hospital-b hospital-c \
        --data-root /srv/fedopal/data --set name=consortium --export /srv/fedopal/jobs --flavor no-code
    fedopal job --config app_configs/demo.yaml --simulate [--workspace workspace] [--results results/demo]

The job is NVFlare's FedAvgRecipe with FedOPAL's components:
- server: GlobalStateModel (the shared tensors only, carried by the job: the server builds no model),
  SharedKeyAggregator (validating, server-owned weights), FedOpalFedAvg (rounds close without dead sites),
  WireRecorder (the wire audit), TensorBoard;
- every site: FedOpalSiteExecutor (NVFlare's Client API executor running fedopal.site.client, with the job's config
  as its argument), the job's own WireContractEnforcer, and, as the config says, DPUpdateFilter and the quantizer.

Two flavors of the same job:
- **no-code** (`<name>`): the app folders hold configuration only. Sites (and the server) run the fedopal runtime
  they installed, at the version the job was built with (checked at site start); a site may turn bring-your-own-code
  off.
- **code-shipping** (`<name>_code`): the same job with the fedopal modules it imports in each app's custom/ folder,
  for rehearsal (simulator, POC) where the runtime is not installed; submitting it needs the `byoc` right.

`--sites` is the deploy map: the exported job deploys to the server and exactly those sites.
The job asks for the privacy scope PRIVACY_SCOPE: a site whose local/privacy.json defines it applies its own
result filters first and its own wire-contract enforcer last (`fedopal site-policy`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings

import yaml

import fedopal
from fedopal.config import (HEADLINE, ConfigError, FedOpalConfig, config_from_dict, job_dict, load_config,
                            parse_overrides)
from fedopal.site.state import job_identity, simulation_state_root
from fedopal.specs.methods import get_method
from fedopal.tools import watchdog

PACKAGE_DIR = os.path.dirname(os.path.abspath(fedopal.__file__))
CUSTOM_ROOT = os.path.dirname(PACKAGE_DIR)  # FLARE resolves the relative site script from here
SITE_SCRIPT = "fedopal/site/client.py"  # relative, so the exported job holds no path of this machine
# the packages a code-shipping job ships, as regular packages (their __init__.py): FLARE puts the job's custom/
# first on the path, so at a site that also installed fedopal the shipped copy is the one that runs
SHIPPED_PACKAGES = ("fedopal", "fedopal/specs", "fedopal/policy", "fedopal/model", "fedopal/site", "fedopal/server")
PRIVACY_SCOPE = "fedopal"  # the scope name in each site's local/privacy.json
FLAVORS = ("no-code", "code")
CODE_SUFFIX = "_code"  # the code-shipping flavor's job name: <name>_code


class JobBuildError(ValueError):
    """The job cannot be built as asked; the message says why and the fix."""


def resource_spec(cfg: FedOpalConfig) -> dict | None:
    """FLARE's per-site resource request (meta.json `resource_spec`): with train.device cuda or cuda:N, every site
    must offer train.nproc_per_site GPUs with federation.gpu_mem_gib GiB each, or FLARE does not schedule the job
    (the site's GPUResourceManager, from `capacity` in project.yml, decides). With device auto or cpu: none."""
    if not cfg.train.device.startswith("cuda"):
        return None
    request = {"num_of_gpus": cfg.train.nproc_per_site, "mem_per_gpu_in_GiB": cfg.federation.gpu_mem_gib}
    return {site: dict(request) for site in cfg.federation.sites()}


def initial_shared_state(cfg: FedOpalConfig) -> dict:
    """The method's shared tensors at the job's seed, as every site initializes them: built here, where the job is
    built (the coordinator has the foundation model), and carried by the job to the server."""
    from fedopal.model.adapters import build_model
    from fedopal.specs.methods import NOTHING_SHARED_KEY

    import torch

    shared = build_model(cfg, get_method(cfg.train.method, cfg.model.head)).shared_state()
    return shared or {NOTHING_SHARED_KEY: torch.zeros(1)}


class SiteRunner:
    """What FedAvgRecipe calls a client runner: puts FedOpalSiteExecutor on every task at every site; in the
    code-shipping flavor, also the site script and any extra files as the app's custom/ resources."""

    def __init__(self, executor, resources: list[str]):
        self.executor = executor
        self.resources = resources

    def add_to_fed_job(self, job, ctx, **kwargs):
        job.add_executor(self.executor, tasks=kwargs.get("tasks", ["*"]), ctx=ctx)
        if self.resources:
            job.add_resources(resources=self.resources, ctx=ctx)
        return {}


_SHLEX_SPECIAL = frozenset(" \t\r\n\v\f'\"\\")


def linear_secret_scan() -> None:
    """Make NVFlare's scan of a generated job for secrets linear in a long plain string; its findings are unchanged.

    Before it starts the simulator, NVFlare (fuel.utils.secret_utils) splits every string of the job's configs with
    shlex, character by character and worse than linearly in a token's length. The server config carries the job's
    initial shared state as one base64 string (job.build_recipe): 0.2 M characters with LoRA alone, 4.8 M with a
    shared UNETR decoder (fedavg_lora, ffa_lora), more with full_ft: the parent process of a one-round fedavg_lora
    segmentation run spent 9 minutes or more in it before any site started. A string with no whitespace, quote or backslash is one shlex
    token (shlex.split(s) == [s] there, comments being off); for such a string this returns it without the
    character loop. Every other string takes NVFlare's own path. Idempotent."""
    from nvflare.fuel.utils import secret_utils

    split = secret_utils._split_token_variants
    if getattr(split, "fedopal_linear", False):
        return

    def fast_split(text: str) -> list[list[str]]:
        if text and _SHLEX_SPECIAL.isdisjoint(text):
            return [[text]]
        return split(text)

    fast_split.fedopal_linear = True
    secret_utils._split_token_variants = fast_split


def mlflow_config(cfg: FedOpalConfig, uri: str | None, where: str) -> dict:
    """NVFlare's MLflowReceiver settings: the experiment is the job's name; every run carries the fedopal version
    and the job's identity as tags, the experiment the job's config as its note (settings only: nothing here is
    derived from a site's data). uri None: NVFlare's default, an SQLite file in the job's result folder."""
    note = "FedOPAL job config:\n\n```yaml\n" + yaml.safe_dump(job_dict(cfg), sort_keys=False) + "```"
    tags = {"fedopal_version": fedopal.__version__, "fedopal_job": job_identity(job_dict(cfg)),
            "method": cfg.train.method, "tracked_at": where}
    config = {"kw_args": {"experiment_name": cfg.name, "run_name": where, "run_tags": tags,
                          "experiment_tags": {"mlflow.note.content": note, **tags}}}
    return config | ({"tracking_uri": uri} if uri else {})


def add_tracking(recipe, cfg: FedOpalConfig) -> None:
    """federation.tracking on the server (TensorBoard, MLflow or both) and, with federation.site_mlflow, an MLflow
    at every site. What reaches any of them is what the site script tracks: the tags the job's wire policy allows
    (SiteRuntime.track); the sites' own privacy.json enforcer removes more before anything leaves."""
    from nvflare.recipe import add_experiment_tracking

    fed = cfg.federation
    if fed.tracking in ("tensorboard", "both"):
        add_experiment_tracking(recipe, "tensorboard")
    if fed.tracking in ("mlflow", "both"):
        add_experiment_tracking(recipe, "mlflow", mlflow_config(cfg, fed.mlflow_uri, "server"))
    if fed.site_mlflow:
        add_experiment_tracking(recipe, "mlflow", mlflow_config(cfg, fed.site_mlflow_uri, "site"), client_side=True,
                                server_side=False)


def build_recipe(cfg: FedOpalConfig, code: bool = True, resume: tuple[str, int] | None = None,
                 python: str = "python3", site_script: str = "", extra_files: tuple[str, ...] = (),
                 site_policy_only: bool = False, measure_wire: bool = False):
    """The job as an NVFlare recipe (run it in SimEnv, or export it).

    code: ship the fedopal modules the job imports in custom/ (rehearsal); False: configuration only.
    resume: (global checkpoint, its round): continue an aborted job from there (round counter included).
    python: the interpreter of a multi-process site's torchrun command (the exported job says python3).
    site_script, extra_files: tests only, a site script shipped in custom/ instead of fedopal's (a leaking one).
    site_policy_only: leave out the job's own wire-contract enforcer (the sites' privacy.json must protect alone).
    measure_wire: also the server's WireSizeProbe (each train result's serialized size; tools/he_compare.py)."""
    from nvflare.apis.job_def import JobMetaKey
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe.utils import set_recipe_meta

    from fedopal.policy.enforcer import WireContractEnforcer
    from fedopal.policy.privacy import DPUpdateFilter
    from fedopal.server.aggregator import SharedKeyAggregator
    from fedopal.server.global_model import encode_state, expected_spec
    from fedopal.server.recorder import WireRecorder
    from fedopal.site.executor import FedOpalSiteExecutor
    from fedopal.site.runtime import job_policy

    if site_script and not code:
        raise JobBuildError("a test site script needs the code-shipping flavor (code=True)")
    linear_secret_scan()  # a shared decoder makes the initial state a string of millions of characters
    start_round = resume[1] + 1 if resume else 0
    min_clients = cfg.federation.required_sites()
    executor = FedOpalSiteExecutor(
        job_config=job_dict(cfg), built_for=fedopal.__version__,
        script_args=f"--resume-round {resume[1]}" if resume else "", nproc_per_site=cfg.train.nproc_per_site,
        python=python, site_script=site_script)
    resources = ([SITE_SCRIPT] + [f"{pkg}/__init__.py" for pkg in SHIPPED_PACKAGES] + list(extra_files)) if code \
        else []

    class FedOpalRecipe(FedAvgRecipe):
        """FedAvgRecipe with FedOPAL's site executor, and a round counter that can start where an aborted job
        stopped."""

        def __init__(self, *, start_round: int = 0, **kwargs):
            self.start_round = start_round
            super().__init__(**kwargs)

        def _create_client_runner(self, site_config):
            return SiteRunner(executor, resources)

        def _get_controller_kwargs(self):
            return {"start_round": self.start_round} if self.start_round else {}

        def _create_controller(self, persistor_id, model_params, model_aggregator):
            from fedopal.server.controller import FedOpalFedAvg

            return FedOpalFedAvg(
                num_clients=self.min_clients, num_rounds=self.num_rounds, persistor_id=persistor_id,
                model=model_params, save_filename=self.save_filename, aggregator=model_aggregator,
                stop_cond=self.stop_cond, patience=self.patience, task_name="train", exclude_vars=self.exclude_vars,
                aggregation_weights=self.aggregation_weights, memory_gc_rounds=self.server_memory_gc_rounds,
                enable_tensor_disk_offload=self.enable_tensor_disk_offload,
                min_responses=min_clients if min_clients < cfg.federation.num_sites else 0,
                straggler_wait=cfg.federation.straggler_wait_s, **self._get_controller_kwargs())

    initial = initial_shared_state(cfg)
    encoded, sha256 = encode_state(initial)
    warnings.filterwarnings("ignore", message=r"Potential secret value in (generated|exported) job file "
                                              r"'config_fed_server\.json'")
    # (the server config's only high-entropy values are the initial state and its SHA-256, which are not secrets)
    he = cfg.federation.encryption == "he"
    if he and resume:
        raise JobBuildError("federation.encryption he cannot resume: the server's checkpoint holds the global model "
                            "encrypted. Fix: run the job again from the start.")
    server_model = {"class_path": "fedopal.server.global_model.GlobalStateModel",
                    "args": {"initial_state": encoded, "initial_state_sha256": sha256}}
    if he:
        recipe = he_recipe(cfg, executor, resources, server_model, min_clients, expected_spec(initial))
    else:
        recipe = FedOpalRecipe(
            start_round=start_round,
            initial_ckpt=resume[0] if resume else None,
            name=cfg.name,
            model=server_model,
            min_clients=min_clients,
            num_rounds=cfg.train.num_rounds - start_round,
            train_script=SITE_SCRIPT,
            aggregator=SharedKeyAggregator(expected=expected_spec(initial),
                                           weighting=cfg.federation.weighting(cfg.privacy.enabled),
                                           max_site_weight=cfg.federation.max_site_weight),
            key_metric=f"personalized/val/{HEADLINE[cfg.data.task]}",
        )
    if code:  # the server model is named by class path only, which NVFlare's exporter does not follow
        recipe.add_server_file("fedopal/server/global_model.py")
    else:
        recipe._job.set_app_packages(["fedopal"])  # NVFlare: code of these packages is installed, never shipped
    privacy = cfg.privacy
    if privacy.enabled and privacy.mode == "update":
        # clip + noise the round's update on the site, before any quantization
        recipe.add_client_output_filter(DPUpdateFilter(clip_norm=privacy.clip_norm, noise_multiplier=update_noise(cfg),
                                                       delta=privacy.delta, accountant=privacy.accountant),
                                        tasks=["train"])
    if he:
        # encrypt last, after DP (the site clips and noises its update in the clear, then encrypts it); the job's
        # wire-contract enforcer still sees the message after this (the tensor keys, now ciphertexts, and meta)
        from fedopal.he import HESiteDecryptor, HESiteEncryptor

        recipe.add_client_output_filter(HESiteEncryptor(
            weigh_by_local_iter=cfg.federation.weighting(cfg.privacy.enabled) == "samples"), tasks=["train"])
        recipe.add_client_input_filter(HESiteDecryptor(expected=expected_spec(initial)), tasks=["train"])
    if cfg.federation.quantization != "none":
        from fedopal.transfer import ServerDequantizer, SiteQuantizer

        recipe.add_client_output_filter(SiteQuantizer(quantization_type=cfg.federation.quantization), tasks=["train"])
        recipe.add_server_input_filter(ServerDequantizer(), tasks=["train"])
    if not site_policy_only:
        # the job's own wire policy, after every filter (a site's privacy.json enforcer, if any, runs after it)
        policy = job_policy(cfg)
        recipe._add_to_client_apps(WireContractEnforcer(allow_groups=list(policy.allow_groups),
                                                        allow_fields=list(policy.allow_fields),
                                                        require_dp=policy.require_dp, source="job"),
                                   id="fedopal_wire_contract_job")
    if cfg.federation.cross_site_eval:
        # NVFlare's cross-site evaluation of the final global model on every site (sites submit no model: their
        # personal tensors never leave); each site answers with the metrics its wire policy allows
        from nvflare.recipe.utils import add_final_global_evaluation

        add_final_global_evaluation(recipe)
    set_recipe_meta(recipe, JobMetaKey.SCOPE, PRIVACY_SCOPE)
    if resource_spec(cfg):
        set_recipe_meta(recipe, JobMetaKey.RESOURCE_SPEC, resource_spec(cfg))
    # Between rounds, sites poll for the next task; FLARE's 2 s answer "try again later" cost ~2.5 s a round.
    recipe.add_server_config({"server": {"task_request_interval": cfg.federation.task_request_interval_s}})
    add_tracking(recipe, cfg)
    recipe._job.to_server(WireRecorder(), id="fedopal_wire_recorder")  # as NVFlare's own helpers add components
    if measure_wire:
        from fedopal.he import WireSizeProbe

        recipe._job.to_server(WireSizeProbe(), id="fedopal_wire_size_probe")
    return recipe


def he_recipe(cfg: FedOpalConfig, executor, resources: list[str], server_model: dict, min_clients: int,
              expected: dict):
    """federation.encryption he: NVFlare's HE workflow (as FedAvgRecipeWithHE wires it: ScatterAndGather, the HE
    shareable generator, the in-time HE aggregator, the persistor's HE serialization filter), with FedOPAL's server
    model, site executor and the checking aggregator of fedopal.he. The site filters (encryptor after DP, decryptor)
    are added by build_recipe. Needs provisioned TenSEAL contexts (HEBuilder): refuses the simulator."""
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
    from nvflare.app_opt.he.model_serialize_filter import HEModelSerializeFilter
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.app_opt.pt.job_config.model import PTModel
    from nvflare.recipe.spec import Recipe
    from nvflare.recipe.utils import recipe_model_to_job_model

    from fedopal.he import HEGlobalUpdater, HESharedKeyAggregator

    class FedOpalHERecipe(Recipe):
        def process_env(self, env):
            from nvflare.recipe.sim_env import SimEnv

            if isinstance(env, SimEnv):
                raise JobBuildError("federation.encryption he does not run in the simulator: the TenSEAL contexts "
                                    "come from provisioning (HEBuilder). Fix: run it in POC (make poc-he) or a "
                                    "provisioned deployment, or set federation.encryption none.")
            super().process_env(env)

    job = BaseFedJob(name=cfg.name, min_clients=min_clients,
                     key_metric=f"personalized/val/{HEADLINE[cfg.data.task]}")
    model = recipe_model_to_job_model(server_model)
    job.to_server(HEModelSerializeFilter(), id="model_serialize_filter")
    persistor = PTFileModelPersistor(model=model, filter_id="model_serialize_filter")
    job.comp_ids.update(job.to_server(PTModel(model=model, persistor=persistor)))
    generator_id = job.to_server(HEGlobalUpdater(), id="shareable_generator")
    aggregator_id = job.to_server(HESharedKeyAggregator(expected=expected,
                                                        weighting=cfg.federation.weighting(cfg.privacy.enabled),
                                                        max_site_weight=cfg.federation.max_site_weight),
                                  id="aggregator")
    partial = min_clients < cfg.federation.num_sites
    job.to_server(ScatterAndGather(min_clients=min_clients, num_rounds=cfg.train.num_rounds,
                                   wait_time_after_min_received=cfg.federation.straggler_wait_s if partial else 0,
                                   aggregator_id=aggregator_id, persistor_id=job.comp_ids.get("persistor_id", ""),
                                   shareable_generator_id=generator_id))
    job.to_clients(SiteRunner(executor, resources))
    return FedOpalHERecipe(job)


def update_noise(cfg: FedOpalConfig) -> float:
    """privacy.mode update: the noise multiplier the job's filter applies (given, or calibrated so that
    train.num_rounds releases end at privacy.target_epsilon)."""
    from fedopal.policy.privacy import update_noise_for_epsilon

    p = cfg.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return round(update_noise_for_epsilon(p.target_epsilon, cfg.train.num_rounds, p.delta, p.accountant), 6)


def privacy_line(cfg: FedOpalConfig, num_params: int) -> str | None:
    """Update mode: the expected signal-to-noise of the averaged update, said at job start (with a warning below 1)."""
    from fedopal.policy.privacy import update_signal_to_noise

    p = cfg.privacy
    if not (p.enabled and p.mode == "update"):
        return None
    sigma, k = update_noise(cfg), cfg.federation.num_sites
    snr = update_signal_to_noise(sigma, num_params, k)
    line = (f"DP (update mode): noise multiplier {sigma:.3g}, clip C = {p.clip_norm:g}, {num_params:,} shared "
            f"parameters, {k} sites: the averaged update's noise has norm about sigma C sqrt(d) / sqrt(K) = "
            f"{sigma * p.clip_norm * (num_params ** 0.5) / k ** 0.5:.3g} against a signal of at most C: "
            f"signal-to-noise {snr:.3g}")
    if snr < 1:
        line += (". WARNING: below 1, the global model will be mostly noise; fewer shared parameters (lower "
                 "model.lora_rank), more sites or a larger epsilon raise it (docs/privacy.md)")
    return line


def shared_param_count(cfg: FedOpalConfig) -> int:
    """d: the number of shared parameters a site releases each round."""
    from fedopal.specs.methods import NOTHING_SHARED_KEY

    return sum(v.numel() for k, v in initial_shared_state(cfg).items() if k != NOTHING_SHARED_KEY)


def code_job_name(name: str) -> str:
    return name + CODE_SUFFIX


def export_job(cfg: FedOpalConfig, jobs_dir: str, flavor: str = "no-code", **recipe_options) -> str:
    """Export one flavor of the job to <jobs_dir>/<name> (no-code) or <jobs_dir>/<name>_code (code-shipping);
    returns the folder. The deploy map is the server and exactly the config's sites. recipe_options: build_recipe's
    keyword options (tests)."""
    if flavor not in FLAVORS:
        raise JobBuildError(f"--flavor {flavor!r}: one of {', '.join(FLAVORS)}")
    jobs_dir = os.path.abspath(jobs_dir)
    code = flavor == "code"
    if code and cfg.name == code_job_name(cfg.name.removesuffix(CODE_SUFFIX)):
        raise JobBuildError(f"name {cfg.name!r} ends with {CODE_SUFFIX}, the code-shipping flavor's suffix. Fix: "
                            "rename the job.")
    name = code_job_name(cfg.name) if code else cfg.name
    target = os.path.join(jobs_dir, name)
    with contextlib.chdir(CUSTOM_ROOT):
        recipe = build_recipe(cfg.model_copy(update={"name": name}), code=code, **recipe_options)
        with tempfile.TemporaryDirectory(dir=jobs_dir if os.path.isdir(jobs_dir) else None) as staging:
            recipe.export(staging)
            built = os.path.join(staging, name)
            _set_deploy_map(built, cfg.federation.sites())
            shipped = sorted(glob_files(built, "custom"))
            if not code and shipped:
                raise JobBuildError(f"the no-code job would ship {shipped[:3]}: only installed code may run. Fix: "
                                    "report this (a component outside the fedopal package).")
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.makedirs(jobs_dir, exist_ok=True)
            shutil.move(built, target)
    return target


def export_both(cfg: FedOpalConfig, jobs_dir: str, **recipe_options) -> list[str]:
    return [export_job(cfg, jobs_dir, flavor, **recipe_options) for flavor in FLAVORS]


def glob_files(job_folder: str, folder: str) -> list[str]:
    """Files under any app's <folder>/ (custom: the code a job ships)."""
    out = []
    for app in os.listdir(job_folder):
        root = os.path.join(job_folder, app, folder)
        for dirpath, _, files in os.walk(root):
            out += [os.path.relpath(os.path.join(dirpath, f), job_folder) for f in files if "__pycache__" not in dirpath]
    return out


def _set_deploy_map(job_folder: str, sites: list[str]) -> None:
    """meta.json's deploy map: the server and exactly these sites (FLARE's recipe writes @ALL: any connected site)."""
    path = os.path.join(job_folder, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    (app,) = meta["deploy_map"]
    meta["deploy_map"] = {app: ["server", *sites]}
    with open(path, "w") as f:
        json.dump(meta, f, indent=4)


def config_of_job(job_folder: str) -> FedOpalConfig:
    """The FedOPAL config an exported job carries (its site executor's job_config)."""
    for app in sorted(os.listdir(job_folder)) if os.path.isdir(job_folder) else []:
        path = os.path.join(job_folder, app, "config", "config_fed_client.json")
        if os.path.isfile(path):
            with open(path) as f:
                for executor in json.load(f).get("executors", []):
                    args = executor.get("executor", {}).get("args", {})
                    if "job_config" in args:
                        return config_from_dict(args["job_config"], source=path)
    raise JobBuildError(f"{job_folder}: no FedOPAL site executor with a job_config. Fix: give a job exported by "
                        "fedopal job --export.")


class ProgressWatcher(threading.Thread):
    """Prints one line per site and round while the simulator runs, from each site's metrics log."""

    def __init__(self, workspace: str, num_rounds: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.workspace, self.num_rounds, self.interval = workspace, num_rounds, interval
        self._seen: dict[str, int] = {}
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.interval):
            self.poll()

    def poll(self):
        from fedopal.tools.report import metrics_files
        from fedopal.site.state import read_metrics

        for path in metrics_files(self.workspace):
            records = read_metrics(os.path.dirname(path))
            start = self._seen.get(path, 0)
            if start == 0 and records and records[0].get("device"):
                print(f"  {records[0]['site']} trains on {records[0]['device']}", flush=True)
            for r in records[start:]:
                print(f"  round {r['round']}/{self.num_rounds}  {r['site']:<8} "
                      f"task loss {r['task_loss']:.3f}  orth {r['orth_loss']:.4f}  "
                      + (f"val Dice {r['personalized/val/dice']:.3f}" if "personalized/val/dice" in r else
                         f"val bal.acc {r['personalized/val/balanced_accuracy']:.3f}") + f"  ({r['wall_s']:.1f} s)",
                      flush=True)
            self._seen[path] = len(records)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=5)
        self.poll()


def preflight(cfg: FedOpalConfig) -> None:
    """Everything that can be checked before FLARE starts: the device, every site's data, and the backbone (weights,
    checkpoint). Raises DeviceError / DataError / BackboneError with a one-line message; nothing on disk is touched."""
    from fedopal.model.adapters import build_model
    from fedopal.site.device import check_precision, resolve_device
    from fedopal.site.data import DataError
    from fedopal.site.validate import inspect_site

    check_precision(resolve_device(cfg.train.device), cfg.train.precision)
    bad = [c for c in (inspect_site(cfg, site) for site in cfg.federation.sites()) if c.problems]
    if bad:  # every site checked: the first problem, and how many more where
        first, total = bad[0].problems.items[0][1], sum(len(c.problems) for c in bad)
        where = ", ".join(f"{c.site} {len(c.problems)}" for c in bad)
        raise DataError(first + (f" (+{total - 1} more problem{'s' if total > 2 else ''}: {where}; fedopal validate "
                                 "lists them all)" if total > 1 else ""))
    build_model(cfg, get_method(cfg.train.method, cfg.model.head))


GLOBAL_CHECKPOINT = os.path.join("server", "simulate_job", "app_server", "FL_global_model.pt")


class ResumeError(ValueError):
    """Nothing (or nothing usable) to resume; the message says what was looked for."""


def checkpoint_round(ckpt: str, num_rounds: int) -> int:
    """The last round a global checkpoint holds (FLARE's persistor records it), checked against num_rounds."""
    import torch

    if not os.path.isfile(ckpt):
        raise ResumeError(f"{ckpt}: no global checkpoint to resume from. Fix: run without --resume, or give "
                          "the path of the aborted job's FL_global_model.pt.")
    try:  # tensors and plain containers only: a file that would need pickle to load is refused, never executed
        last_round = torch.load(ckpt, map_location="cpu", weights_only=True)["meta_props"]["current_round"]
    except pickle.UnpicklingError:
        raise ResumeError(f"{ckpt}: refused, it holds Python objects that only pickle can load (torch.load "
                          "weights_only=True). Fix: give the FL_global_model.pt FLARE wrote for the aborted job.") from None
    except Exception as err:  # a foreign or damaged file
        raise ResumeError(f"{ckpt}: not a FLARE global checkpoint ({type(err).__name__}). "
                          "Fix: give the FL_global_model.pt of the aborted job.") from None
    if last_round + 1 >= num_rounds:
        raise ResumeError(f"{ckpt}: the job already finished round {last_round + 1} of {num_rounds}. "
                          "Fix: raise train.num_rounds to train on, or run without --resume.")
    return last_round


def resume_point(job_ws: str, state_root: str, num_rounds: int) -> tuple[str, int]:
    """Keep the aborted job's last global checkpoint out of the simulator's reach; return (copy, its round)."""
    ckpt = os.path.join(job_ws, GLOBAL_CHECKPOINT)
    last_round = checkpoint_round(ckpt, num_rounds)
    kept = os.path.join(state_root, f"global_round_{last_round}.pt")
    os.makedirs(state_root, exist_ok=True)
    shutil.copyfile(ckpt, kept)
    return kept, last_round


def simulate(cfg: FedOpalConfig, workspace: str, home: str | None = None, resume: bool = False,
             gpus: str | None = None, site_lost_grace_s: float = watchdog.GRACE_S) -> str:
    """Run the job in the FLARE simulator; returns the job's workspace folder.

    Sites keep their state beside it (site_state.simulation_state_root). resume=True continues an aborted
    or finished job of the same name from its last global checkpoint and each site's last personal state.
    gpus: FLARE's simulator GPU option, e.g. "0,1" (sites take turns: site-1 on GPU 0, site-2 on GPU 1, site-3 on
    GPU 0, ...) or "[0,1],[2,3]" (groups, for train.nproc_per_site 2); each site process sees only its group
    (CUDA_VISIBLE_DEVICES), so train.device auto or cuda picks it as cuda:0.
    Raises SiteLostError (one line) when a site process dies and fewer than federation.min_clients are left:
    FLARE's simulator would wait for it forever; it is stopped site_lost_grace_s seconds later (tools/watchdog.py).
    Not where sites take turns on fewer GPU groups than sites: their processes come and go with their turns."""
    from nvflare.recipe import SimEnv

    workspace = os.path.abspath(workspace)
    os.environ["FEDOPAL_HOME"] = os.path.abspath(home or os.environ.get("FEDOPAL_HOME") or os.getcwd())
    job_ws = os.path.join(workspace, cfg.name)
    state_root = simulation_state_root(job_ws)
    resume_from = resume_point(job_ws, state_root, cfg.train.num_rounds) if resume else None
    if not resume:
        for folder in (job_ws, state_root):
            if os.path.isdir(folder):
                shutil.rmtree(folder)
    if cfg.site_state_dir is None:
        cfg = cfg.model_copy(update={"site_state_dir": state_root})
    sites = cfg.federation.sites()
    watcher = ProgressWatcher(job_ws, cfg.train.num_rounds)
    from nvflare.private.fed.utils.fed_utils import split_gpus

    # with fewer GPU groups than sites FLARE runs one site per group at a time: a site's process comes and goes with
    # its turn, and a missing one is not a lost one
    takes_turns = gpus is not None and 1 < len(split_gpus(gpus)) < len(sites)
    guard = None if takes_turns else watchdog.SiteWatchdog(job_ws, sites, cfg.federation.required_sites(),
                                                           site_lost_grace_s)
    with contextlib.chdir(CUSTOM_ROOT):
        recipe = build_recipe(cfg, resume=resume_from, python=sys.executable)
        env = SimEnv(clients=sites, workspace_root=workspace, log_config="WARNING", gpu_config=gpus)
        watcher.start()
        if guard:
            guard.start()
        try:
            with filtered_output(EXPECTED_SHUTDOWN):
                recipe.run(env)
        except RuntimeError:
            if guard and guard.failure:
                raise watchdog.SiteLostError(guard.failure) from None
            raise
        finally:
            if guard:
                guard.stop()
            watcher.stop()
    return job_ws


# What FLARE's simulator prints at every normal end of a job (2 WARNING lines per site): noise to a user. They stay
# in each site's log.txt; only the console is spared.
EXPECTED_SHUTDOWN = re.compile(r"InProcessClientAPI - WARNING - (ask to stop job: reason: END_RUN received|"
                               r"request to stop the job for reason END_RUN received)")


@contextlib.contextmanager
def filtered_output(drop: re.Pattern):
    """Drop lines matching `drop` from what this process and its children (the simulator's processes, which
    inherit the descriptor) write to stdout. Anything else passes through unchanged, as it comes.
    By hand: FLARE's log configuration has no per-message filter that its subprocesses could import."""
    if not hasattr(sys.stdout, "fileno"):
        yield
        return
    try:
        out_fd = sys.stdout.fileno()
    except (OSError, ValueError):  # pytest's capture or another stand-in: nothing to filter at the descriptor
        yield
        return
    sys.stdout.flush()
    read_fd, write_fd = os.pipe()
    saved = os.dup(out_fd)
    os.dup2(write_fd, out_fd)
    os.close(write_fd)

    def pump():
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not drop.search(line.decode(errors="replace")):
                    try:
                        os.write(saved, line)
                    except OSError:  # restored and closed: a straggling child's last words
                        return

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, out_fd)  # closes the pipe's last write end: the reader sees EOF once children let go
        reader.join(timeout=10)
        os.close(saved)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--export", metavar="JOBS_DIR",
                   help="export the job folder to JOBS_DIR/<name> (the repository's jobs/ only when you name it)")
    p.add_argument("--export-dir", dest="export_dir", help="same as --export JOBS_DIR (NVFlare's convention)")
    p.add_argument("--flavor", choices=("both", *FLAVORS), default="both",
                   help="with --export: no-code (configuration only, for sites that installed the fedopal runtime), "
                        "code (ships the code, for rehearsal; needs the byoc right), or both (default)")
    p.add_argument("--resume-from", metavar="CKPT",
                   help="with --export: a job that continues an aborted one from this global checkpoint (a path "
                        "on the server, e.g. its FL_global_model.pt); the round counter continues")
    p.add_argument("--simulate", action="store_true", help="run the job in the FLARE simulator")
    p.add_argument("--workspace", default="workspace", help="simulator workspace root (kept)")
    p.add_argument("--resume", action="store_true",
                   help="continue the job of the same name in --workspace from its last global checkpoint and "
                        "each site's last personal state (after an abort, or with a larger train.num_rounds)")
    p.add_argument("--results", default=None, help="write summary.json/summary.md here after --simulate")
    p.add_argument("--gpus", default=None, metavar="IDS",
                   help="--simulate: GPUs for the sites, FLARE's simulator syntax: '0,1' (sites take turns) or "
                        "'[0,1],[2,3]' (a group per site process, for train.nproc_per_site 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.num_rounds=2 (value parsed as YAML)")
    p.add_argument("--sites", nargs="+", metavar="NAME",
                   help="the consortium's site names, as in project.yml: sets federation.site_names and num_sites "
                        "(and so min_clients, unless the config sets it)")
    p.add_argument("--data-root", metavar="DIR",
                   help="data.root: the folder holding <site>/manifest.csv at every site (the same path at each "
                        "hospital; a relative one resolves against each site's $FEDOPAL_HOME)")
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]  # NVFlare's recipe module would otherwise consume --export itself
    args.export = args.export_dir or args.export
    if not (args.export or args.simulate):
        p.error("give --export JOBS_DIR and/or --simulate")
    try:
        overrides = parse_overrides(args.set)
        if args.sites:
            overrides.update({"federation.site_names": args.sites, "federation.num_sites": len(args.sites)})
        if args.data_root:
            overrides["data.root"] = args.data_root
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.export:
        resume = None
        if args.resume_from:
            try:
                resume = (os.path.abspath(args.resume_from),
                          checkpoint_round(args.resume_from, cfg.train.num_rounds))
            except ResumeError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        line = privacy_line(cfg, shared_param_count(cfg))
        if line:
            print(line)
        try:
            for flavor in FLAVORS if args.flavor == "both" else (args.flavor,):
                print(f"exported {export_job(cfg, args.export, flavor, resume=resume)} ({flavor}, fedopal "
                      f"{fedopal.__version__}, deploys to server, {', '.join(cfg.federation.sites())})")
        except (JobBuildError, ValueError) as err:  # BackboneError (the model cannot be built here) is a ValueError
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.simulate:
        from fedopal.model.backbones import BackboneError
        from fedopal.site.data import DataError
        from fedopal.site.device import DeviceError
        from fedopal.tools.report import summarize, write_summary

        os.environ.setdefault("FEDOPAL_HOME", os.getcwd())
        try:
            preflight(cfg)
        except (DeviceError, DataError, BackboneError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        t0 = time.time()
        print(start_line(cfg), flush=True)
        line = privacy_line(cfg, shared_param_count(cfg))
        if line:
            print(line, flush=True)
        try:
            job_ws = simulate(cfg, args.workspace, resume=args.resume, gpus=args.gpus)
        except (ResumeError, watchdog.SiteLostError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except RuntimeError:  # a site (or the server) died: its own one-line error, from its log
            from fedopal.tools.report import simulation_failure

            print(f"error: {simulation_failure(os.path.join(os.path.abspath(args.workspace), cfg.name))}",
                  file=sys.stderr)
            return 2
        wall = time.time() - t0
        summary = summarize(job_ws, cfg, wall)
        print("\n" + summary["markdown"] + "\n")
        if args.results:
            write_summary(summary, args.results)
            print(f"results:      {os.path.join(args.results, 'summary.md')} (and .json), rounds plot "
                  f"{os.path.join(args.results, 'rounds.png')}")
        state_root = simulation_state_root(job_ws)
        print(f"site models:  {os.path.join(state_root, '<site>', 'export', 'best', 'personalized')} "
              "(fedopal predict --model ...)")
        print(f"TensorBoard:  tensorboard --logdir {os.path.join(job_ws, 'server', 'simulate_job', 'tb_events')}")
        print(f"workspace:    {job_ws}")
        print(f"wall time:    {wall:.0f} s")
    return 0


def start_line(cfg: FedOpalConfig) -> str:
    """The one line a run starts with: what trains, on what, where."""
    from fedopal.site.device import resolve_device

    device = resolve_device(cfg.train.device)
    procs = f" x {cfg.train.nproc_per_site} processes" if cfg.train.nproc_per_site > 1 else ""
    rounds = cfg.train.num_rounds
    return (f"Running {cfg.name} in the FLARE simulator: {cfg.train.method}, {cfg.model.backbone} at "
            f"{cfg.data.image_size}{'²' if cfg.data.spatial_dims == 2 else '³'}, on {device}{procs} "
            f"({cfg.train.precision}), {cfg.federation.num_sites} sites, {rounds} round{'s' if rounds != 1 else ''}")


if __name__ == "__main__":
    sys.exit(main())
