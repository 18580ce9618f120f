"""`fedopal site-policy KIT_DIR --policy FILE [--deny-byoc]`: a site's own rules, written into its FLARE startup kit.

The policy's code is the fedopal runtime the site installed and pinned (fedopal.policy, from the wheel): nothing is
copied. What is written is the site's configuration, in FLARE's own files under `<kit>/local/`:

- `privacy.json`: the site's policy file as given: scope `fedopal` (its result filters: tensor-group allow-list,
  differential privacy) and, under `components`, the site's WireContractEnforcer, which FLARE adds to every job at
  the site after the job's own components: the site's last word on what leaves (docs/privacy.md).
- `resources.json`: NVFlare's component allow-list for jobs without code (`class_allow_list`): the list the site has
  (or NVFlare's default), plus the classes a FedOPAL job names (FEDOPAL_JOB_CLASSES), minus NVFlare's job log
  streamer; and `allow_log_streaming: false`. A provisioned NVFlare 2.9 site streams every job's `error_log.txt` to
  the server by default (its SiteLogStreamer injects a JobLogStreamer into each job); an error line can hold a path,
  a patient id or a value, outside the wire contract. A site that wants it back sets it to true, knowingly
  (a kit given a --policy, i.e. a site; the server's kit keeps its own setting).
- with `--deny-byoc`, `authorization.json`: no one may run a job that ships code at this site; FedOPAL's no-code
  jobs still run (docs/deploy.md).

Works on a POC site, a provisioned hospital kit and the server's kit (the server needs the allow-list too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

POLICY_FILE, RESOURCES_FILE, AUTHZ_FILE = "privacy.json", "resources.json", "authorization.json"
ENFORCER_CLASS = "fedopal.policy.enforcer.WireContractEnforcer"
# every class a FedOPAL job (any method, privacy mode, quantization, cross-site evaluation) names that NVFlare's
# default allow-list lacks; tests/test_site_policy.py holds it against exported jobs
FEDOPAL_JOB_CLASSES = (
    "fedopal.site.executor.FedOpalSiteExecutor",
    "fedopal.policy.enforcer.WireContractEnforcer",
    "fedopal.policy.privacy.DPUpdateFilter",
    "fedopal.transfer.SiteQuantizer",
    "fedopal.server.global_model.GlobalStateModel",
    "fedopal.server.aggregator.SharedKeyAggregator",
    "fedopal.server.controller.FedOpalFedAvg",
    "fedopal.server.recorder.WireRecorder",
    "fedopal.transfer.ServerDequantizer",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
)
# in NVFlare's default list, but it streams a site's log files to the server: outside the wire contract
NOT_ALLOWED = ("nvflare.app_common.logging.job_log_streamer.JobLogStreamer",)
RIGHTS = ("submit_job", "clone_job", "manage_job", "download_job", "view", "operate", "shell_commands", "byoc",
          "server-predeployed-flwr")


class PolicyInstallError(ValueError):
    """The kit or the policy file cannot be used; the message names the file and the fix."""


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PolicyInstallError(f"{path}: {what} not found. Fix: give an existing file.") from None
    except json.JSONDecodeError as err:
        raise PolicyInstallError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}). Fix the syntax.") from None
    if not isinstance(data, dict):
        raise PolicyInstallError(f"{path}: {what} must be a JSON object. Fix the file.")
    return data


def read_policy(path: str) -> dict:
    """A site's privacy.json, parsed and checked: its scopes, and its enforcer's arguments (built here, so a typo
    stops the install, not a job). PolicyInstallError (one line) if it is not usable."""
    policy = _read_json(path, "policy file")
    if not isinstance(policy.get("scopes"), list):
        raise PolicyInstallError(f"{path}: a privacy.json needs a 'scopes' list. Fix: start from "
                                 "poc_setup/site_privacy.json.")
    for comp in policy.get("components", []):
        if comp.get("path") == ENFORCER_CLASS:
            from fedopal.policy.enforcer import WireContractEnforcer

            try:
                WireContractEnforcer(**comp.get("args", {}))
            except (TypeError, ValueError) as err:
                raise PolicyInstallError(f"{path}: component {comp.get('id')!r}: {err}. Fix its args.") from None
    return policy


def site_enforcer(policy: dict) -> dict | None:
    """The policy's WireContractEnforcer component (None: the site has no last word of its own)."""
    return next((c for c in policy.get("components", []) if c.get("path") == ENFORCER_CLASS), None)


def _local(kit_dir: str) -> str:
    local = os.path.join(kit_dir, "local")
    if not os.path.isdir(local):
        raise PolicyInstallError(f"{kit_dir}: no local/ folder, so this is not a startup kit. Fix: give the folder "
                                 "that holds startup/ and local/.")
    return local


def _current(local: str, name: str) -> dict | None:
    """local/<name>, else FLARE's provisioned local/<name>.default, else None."""
    for candidate in (name, name + ".default"):
        path = os.path.join(local, candidate)
        if os.path.isfile(path):
            return _read_json(path, candidate)
    return None


def install_allow_list(kit_dir: str, site: bool = True) -> list[str]:
    """local/resources.json with class_allow_list = the site's (or NVFlare's default) + FedOPAL's - NOT_ALLOWED, and,
    for a site (not the server), allow_log_streaming false."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local = _local(kit_dir)
    resources = _current(local, RESOURCES_FILE) or {"format_version": 2}
    allow = list(resources.get("class_allow_list") or DEFAULT_CLASS_ALLOW_LIST)
    allow = [c for c in allow if c not in NOT_ALLOWED] + [c for c in FEDOPAL_JOB_CLASSES if c not in allow]
    resources["class_allow_list"] = allow
    if site:
        resources["allow_log_streaming"] = False
    with open(os.path.join(local, RESOURCES_FILE), "w") as f:
        json.dump(resources, f, indent=2)
    return allow


def deny_byoc(kit_dir: str) -> None:
    """local/authorization.json: every role keeps its rights, except `byoc`, which no one has."""
    local = _local(kit_dir)
    authz = _current(local, AUTHZ_FILE)
    if authz is None or not isinstance(authz.get("permissions"), dict):
        raise PolicyInstallError(f"{local}: no authorization.json(.default) with 'permissions'. Fix: give a "
                                 "provisioned startup kit.")
    for role, rights in authz["permissions"].items():
        if isinstance(rights, str):  # "any" / "none" for every right
            rights = {right: rights for right in RIGHTS}
        rights["byoc"] = "none"
        authz["permissions"][role] = rights
    with open(os.path.join(local, AUTHZ_FILE), "w") as f:
        json.dump(authz, f, indent=2)


def install_site_policy(kit_dir: str, policy_file: str | None, no_byoc: bool = False) -> list[str]:
    """Write the kit's privacy.json (when a policy is given), resources.json and, with no_byoc, authorization.json;
    returns the paths written."""
    local = _local(kit_dir)
    written = []
    if policy_file:
        policy = read_policy(policy_file)
        path = os.path.join(local, POLICY_FILE)
        with open(path, "w") as f:
            json.dump(policy, f, indent=2)
        written.append(path)
    install_allow_list(kit_dir, site=policy_file is not None)
    written.append(os.path.join(local, RESOURCES_FILE))
    if no_byoc:
        deny_byoc(kit_dir)
        written.append(os.path.join(local, AUTHZ_FILE))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kit", help="a startup kit folder (holds startup/ and local/): a site's, or the server's")
    p.add_argument("--policy", help="the site's privacy.json (e.g. poc_setup/site_privacy.json); the server's kit "
                                    "needs none")
    p.add_argument("--deny-byoc", action="store_true",
                   help="no one may run a job that ships code here (FedOPAL's no-code jobs still run)")
    args = p.parse_args(argv)
    try:
        written = install_site_policy(args.kit, args.policy, args.deny_byoc)
    except PolicyInstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
