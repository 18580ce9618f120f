"""Build the FLARE job from a config: export it to jobs/, or run it in the simulator.

    python -m fedopal.job --config app_configs/demo.yaml --export jobs/
    python -m fedopal.job --config app_configs/demo.yaml --sites hospital-a hospital-b hospital-c \
        --data-root /srv/fedopal/data --set name=consortium --export /srv/fedopal/jobs
    python -m fedopal.job --config app_configs/demo.yaml --simulate [--workspace workspace] [--results results/demo]

The job is a FedAvgRecipe with our three server/site components:
    GlobalStateModel (server model = shared keys only), SharedKeyAggregator, SharedOnlyFilter (every task),
plus TensorBoard tracking. The fedopal package and the resolved config ship in each app's custom/ folder.
The job asks for the privacy scope PRIVACY_SCOPE: a site whose local/privacy.json defines it applies its own
result filters first (see poc_setup/site_privacy.json).
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

import fedopal
from fedopal.config import ConfigError, FedOpalConfig, job_dict, load_config, parse_overrides
from fedopal.methods import get_method
from fedopal.site_state import simulation_state_root

PACKAGE_DIR = os.path.dirname(os.path.abspath(fedopal.__file__))
CUSTOM_ROOT = os.path.dirname(PACKAGE_DIR)  # FLARE resolves the relative site script from here
SITE_SCRIPT = "fedopal/client.py"  # relative, so the exported job holds no path of this machine
# JSON, not YAML: `nvflare job submit` re-reads and re-writes every config file in a job's custom/ folder, and
# its YAML path needs omegaconf (not installed); JSON round-trips losslessly, and load_config reads it as YAML.
JOB_CONFIG_NAME = "fedopal_job.json"
KEY_METRIC = "personalized/val/balanced_accuracy"
PRIVACY_SCOPE = "fedopal"  # the scope name in each site's local/privacy.json


def _stage_config(cfg: FedOpalConfig, staging: str) -> str:
    """The resolved config, shipped in each site's custom/ folder next to the site script."""
    config_file = os.path.join(staging, JOB_CONFIG_NAME)
    with open(config_file, "w") as f:
        json.dump(job_dict(cfg), f, indent=2)
        f.write("\n")
    return config_file


def site_command(cfg: FedOpalConfig, python: str = "python3") -> str | None:
    """How FLARE starts the site script: None for the in-process Client API (one process per site); with
    train.nproc_per_site N > 1, torchrun (torch.distributed.run) with N processes, one per GPU, through the Client
    API's external-process launcher. --standalone picks a free rendezvous port, so sites sharing a machine (the
    simulator, POC) do not collide."""
    nproc = cfg.train.nproc_per_site
    if nproc == 1:
        return None
    return f"{python} -u -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node={nproc}"


def resource_spec(cfg: FedOpalConfig) -> dict | None:
    """FLARE's per-site resource request (meta.json `resource_spec`): with train.device cuda or cuda:N, every site
    must offer train.nproc_per_site GPUs with federation.gpu_mem_gib GiB each, or FLARE does not schedule the job
    (the site's GPUResourceManager, from `capacity` in project.yml, decides). With device auto or cpu: none."""
    if not cfg.train.device.startswith("cuda"):
        return None
    request = {"num_of_gpus": cfg.train.nproc_per_site, "mem_per_gpu_in_GiB": cfg.federation.gpu_mem_gib}
    return {site: dict(request) for site in cfg.federation.sites()}


def build_recipe(cfg: FedOpalConfig, staging: str, site_filter_only: bool = False, test_leak_personal: bool = False,
                 resume: tuple[str, int] | None = None, python: str = "python3"):
    """resume: (global checkpoint, its round): continue an aborted job from there (round counter included).
    python: the interpreter of a multi-process site's torchrun command (the exported job says python3).
    site_filter_only: leave out the job's own result filter (the sites' privacy.json must protect alone).
    test_leak_personal: TEST ONLY, the site script also sends its personal tensors (see client.py).
    Together they make the job that proves a site-enforced filter stops personal tensors by itself."""
    from nvflare.apis.job_def import JobMetaKey
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import add_experiment_tracking
    from nvflare.recipe.utils import set_recipe_meta

    from fedopal.aggregator import SharedKeyAggregator
    from fedopal.filters import SharedOnlyFilter
    from fedopal.privacy import DPUpdateFilter

    class FedOpalRecipe(FedAvgRecipe):
        """FedAvgRecipe whose round counter can start where an aborted job stopped."""

        def __init__(self, *, start_round: int = 0, **kwargs):
            self.start_round = start_round
            super().__init__(**kwargs)

        def _get_controller_kwargs(self):
            return {"start_round": self.start_round} if self.start_round else {}

        def _create_controller(self, persistor_id, model_params, model_aggregator):
            from fedopal.controller import FedOpalFedAvg

            return FedOpalFedAvg(
                num_clients=self.min_clients, num_rounds=self.num_rounds, persistor_id=persistor_id,
                model=model_params, save_filename=self.save_filename, aggregator=model_aggregator,
                stop_cond=self.stop_cond, patience=self.patience, task_name="train", exclude_vars=self.exclude_vars,
                aggregation_weights=self.aggregation_weights, memory_gc_rounds=self.server_memory_gc_rounds,
                enable_tensor_disk_offload=self.enable_tensor_disk_offload,
                min_responses=min_clients if min_clients < cfg.federation.num_sites else 0,
                straggler_wait=cfg.federation.straggler_wait_s, **self._get_controller_kwargs())

    spec = get_method(cfg.train.method, cfg.model.head)
    config = job_dict(cfg)
    config_file = _stage_config(cfg, staging)
    start_round = resume[1] + 1 if resume else 0
    min_clients = cfg.federation.min_clients or cfg.federation.num_sites
    command = site_command(cfg, python)
    launch = {"launch_external_process": True, "command": command} if command else {}
    recipe = FedOpalRecipe(
        start_round=start_round,
        initial_ckpt=resume[0] if resume else None,
        name=cfg.name,
        model={"class_path": "fedopal.server_model.GlobalStateModel", "args": {"config": config}},
        min_clients=min_clients,
        num_rounds=cfg.train.num_rounds - start_round,
        train_script=SITE_SCRIPT,
        train_args=f"--config {JOB_CONFIG_NAME}" + (" --test-leak-personal" if test_leak_personal else ""),
        aggregator=SharedKeyAggregator(config=config),
        key_metric=KEY_METRIC,
        **launch,
    )
    recipe.add_client_file(config_file)
    if not site_filter_only:
        # Defense in depth: whatever the site script does, only shared keys leave the site, on every task.
        recipe.add_client_output_filter(SharedOnlyFilter(shared_pattern=spec.shared_pattern()), tasks=["*"])
    privacy = cfg.privacy
    if privacy.enabled and privacy.mode == "update":
        # clip + noise the round's update on the site, after the shared-only filter, before any quantization
        recipe.add_client_output_filter(DPUpdateFilter(clip_norm=privacy.clip_norm, noise_multiplier=update_noise(cfg),
                                                       delta=privacy.delta, accountant=privacy.accountant),
                                        tasks=["train"])
    if cfg.federation.quantization != "none":
        from fedopal.transfer import ServerDequantizer, SiteQuantizer

        recipe.add_client_output_filter(SiteQuantizer(quantization_type=cfg.federation.quantization), tasks=["train"])
        recipe.add_server_input_filter(ServerDequantizer(), tasks=["train"])
    if cfg.federation.cross_site_eval:
        # NVFlare's cross-site evaluation of the final global model on every site (sites submit no model: their
        # personal tensors never leave); each site answers with its global-only and personalized test metrics
        from nvflare.recipe.utils import add_final_global_evaluation

        add_final_global_evaluation(recipe)
    set_recipe_meta(recipe, JobMetaKey.SCOPE, PRIVACY_SCOPE)
    if resource_spec(cfg):
        set_recipe_meta(recipe, JobMetaKey.RESOURCE_SPEC, resource_spec(cfg))
    # Between rounds, sites poll for the next task; FLARE's 2 s answer "try again later" cost ~2.5 s a round.
    recipe.add_server_config({"server": {"task_request_interval": cfg.federation.task_request_interval_s}})
    add_experiment_tracking(recipe, "tensorboard")
    return recipe


def update_noise(cfg: FedOpalConfig) -> float:
    """privacy.mode update: the noise multiplier the job's filter applies (given, or calibrated so that
    train.num_rounds releases end at privacy.target_epsilon)."""
    from fedopal.privacy import update_noise_for_epsilon

    p = cfg.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return round(update_noise_for_epsilon(p.target_epsilon, cfg.train.num_rounds, p.delta, p.accountant), 6)


def export_job(cfg: FedOpalConfig, jobs_dir: str, **recipe_options) -> str:
    """recipe_options: build_recipe's keyword options (the tests' privacy job)."""
    jobs_dir = os.path.abspath(jobs_dir)
    target = os.path.join(jobs_dir, cfg.name)
    with tempfile.TemporaryDirectory() as staging, contextlib.chdir(CUSTOM_ROOT):
        recipe = build_recipe(cfg, staging, **recipe_options)
        if os.path.isdir(target):
            shutil.rmtree(target)
        recipe.export(jobs_dir)
    return target


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
        from fedopal.report import metrics_files
        from fedopal.site_state import read_metrics

        for path in metrics_files(self.workspace):
            records = read_metrics(os.path.dirname(path))
            start = self._seen.get(path, 0)
            if start == 0 and records and records[0].get("device"):
                print(f"  {records[0]['site']} trains on {records[0]['device']}", flush=True)
            for r in records[start:]:
                print(f"  round {r['round'] + 1}/{self.num_rounds}  {r['site']:<8} "
                      f"task loss {r['task_loss']:.3f}  orth {r['orth_loss']:.4f}  "
                      f"val bal.acc {r['personalized/val/balanced_accuracy']:.3f}  ({r['wall_s']:.1f} s)",
                      flush=True)
            self._seen[path] = len(records)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=5)
        self.poll()


def preflight(cfg: FedOpalConfig) -> None:
    """Everything that can be checked before FLARE starts: the device, every site's data, and the backbone (weights,
    checkpoint). Raises DeviceError / DataError / BackboneError with a one-line message; nothing on disk is touched."""
    from fedopal.adapters import build_model
    from fedopal.device import check_precision, resolve_device
    from fedopal.validate import check_site

    check_precision(resolve_device(cfg.train.device), cfg.train.precision)
    for site in cfg.federation.sites():
        check_site(cfg, site)
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
             gpus: str | None = None) -> str:
    """Run the job in the FLARE simulator; returns the job's workspace folder.

    Sites keep their state beside it (site_state.simulation_state_root). resume=True continues an aborted
    or finished job of the same name from its last global checkpoint and each site's last personal state.
    gpus: FLARE's simulator GPU option, e.g. "0,1" (sites take turns: site-1 on GPU 0, site-2 on GPU 1, site-3 on
    GPU 0, ...) or "[0,1],[2,3]" (groups, for train.nproc_per_site 2); each site process sees only its group
    (CUDA_VISIBLE_DEVICES), so train.device auto or cuda picks it as cuda:0."""
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
    with tempfile.TemporaryDirectory() as staging, contextlib.chdir(CUSTOM_ROOT):
        recipe = build_recipe(cfg, staging, resume=resume_from, python=sys.executable)
        env = SimEnv(clients=sites, workspace_root=workspace, log_config="WARNING", gpu_config=gpus)
        watcher.start()
        try:
            with filtered_output(EXPECTED_SHUTDOWN):
                recipe.run(env)
        finally:
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
        print(f"exported {export_job(cfg, args.export, resume=resume)}")
    if args.simulate:
        from fedopal.backbones import BackboneError
        from fedopal.data import DataError
        from fedopal.device import DeviceError
        from fedopal.report import summarize, write_summary

        os.environ.setdefault("FEDOPAL_HOME", os.getcwd())
        try:
            preflight(cfg)
        except (DeviceError, DataError, BackboneError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        t0 = time.time()
        print(start_line(cfg), flush=True)
        try:
            job_ws = simulate(cfg, args.workspace, resume=args.resume, gpus=args.gpus)
        except ResumeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except RuntimeError:  # a site (or the server) died: its own one-line error, from its log
            from fedopal.report import simulation_failure

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
              "(python -m fedopal.predict --model ...)")
        print(f"TensorBoard:  tensorboard --logdir {os.path.join(job_ws, 'server', 'simulate_job', 'tb_events')}")
        print(f"workspace:    {job_ws}")
        print(f"wall time:    {wall:.0f} s")
    return 0


def start_line(cfg: FedOpalConfig) -> str:
    """The one line a run starts with: what trains, on what, where."""
    from fedopal.device import resolve_device

    device = resolve_device(cfg.train.device)
    procs = f" x {cfg.train.nproc_per_site} processes" if cfg.train.nproc_per_site > 1 else ""
    rounds = cfg.train.num_rounds
    return (f"Running {cfg.name} in the FLARE simulator: {cfg.train.method}, {cfg.model.backbone} at "
            f"{cfg.data.image_size}{'²' if cfg.data.spatial_dims == 2 else '³'}, on {device}{procs} "
            f"({cfg.train.precision}), {cfg.federation.num_sites} sites, {rounds} round{'s' if rounds != 1 else ''}")


if __name__ == "__main__":
    sys.exit(main())
