"""`fedopal site-policy KIT_DIR [--policy NAME|FILE] [--deny-byoc]`: a site's own rules, written into its FLARE kit.

The policy's code is the fedopal runtime the site installed and pinned (fedopal.policy, from the wheel): nothing is
copied. What is written is the site's configuration, in FLARE's own files under `<kit>/local/`:

- `privacy.json`: the site's policy (a file of its own, or one that ships with the runtime: `global-only`, only the
  global adapter and the site's metrics leave; `global-only-dp`, the same clipped and noised by the site, nothing
  data-derived beside it): scope `fedopal` (its result filters) and, under `components`, the site's
  WireContractEnforcer, which FLARE adds to every job at the site after the job's own components: the site's last
  word on what leaves (docs/privacy.md).
- `resources.json`: NVFlare's component allow-list for jobs without code (`class_allow_list`): the list the kit has
  (or NVFlare's default), plus the classes a FedOPAL job names (FEDOPAL_JOB_CLASSES), minus NVFlare's job log
  streamer; and, in a site's kit, `allow_log_streaming: false`. A provisioned NVFlare 2.9 site streams every job's
  `error_log.txt` to the server by default (its SiteLogStreamer injects a JobLogStreamer into each job); an error
  line can hold a path, a patient id or a value, outside the wire contract. A site that wants it back sets it to
  true, knowingly. The server's kit keeps its own setting.
- with `--deny-byoc`, `authorization.json`: no one may run a job that ships code at this site; FedOPAL's no-code
  jobs still run (docs/deploy.md).

Everything is checked before anything is written (a policy's every class is built with its arguments, its scopes and
keys named right, the kit is a kit): a mistake is one line naming the file and the fix, and the kit is left as it
was. Works on a POC site, a provisioned hospital kit and the server's kit (the server needs the allow-list too).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

POLICY_FILE, RESOURCES_FILE, AUTHZ_FILE = "privacy.json", "resources.json", "authorization.json"
ENFORCER_CLASS = "fedopal.policy.enforcer.WireContractEnforcer"
# the site policies that ship with the runtime (fedopal/policy/sites/<name with _>.json)
SHIPPED_POLICIES = ("global-only", "global-only-dp")
POLICY_KEYS = {"format_version", "scopes", "default_scope", "components"}
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
    "fedopal.he.HESiteEncryptor",  # federation.encryption he
    "fedopal.he.HESiteDecryptor",
    "fedopal.he.HESharedKeyAggregator",
    "fedopal.he.HEGlobalUpdater",
    "fedopal.he.WireSizeProbe",  # server, measuring jobs only (tools/he_compare.py)
)
# in NVFlare's default list, but it streams a site's log files to the server: outside the wire contract
NOT_ALLOWED = ("nvflare.app_common.logging.job_log_streamer.JobLogStreamer",)
RIGHTS = ("submit_job", "clone_job", "manage_job", "download_job", "view", "operate", "shell_commands", "byoc",
          "server-predeployed-flwr")


class PolicyInstallError(ValueError):
    """The kit or the policy file cannot be used; the message names the file and the fix."""


def shipped_policy(name: str) -> str:
    """The file of a policy that ships with the runtime."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "sites", name.replace("-", "_") + ".json")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PolicyInstallError(f"{path}: {what} not found. Fix: give an existing file"
                                 + (f", or one of {', '.join(SHIPPED_POLICIES)}." if what == "policy file" else ".")
                                 ) from None
    except json.JSONDecodeError as err:
        raise PolicyInstallError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}). Fix the syntax.") from None
    if not isinstance(data, dict):
        raise PolicyInstallError(f"{path}: {what} must be a JSON object. Fix the file.")
    return data


def _build(path: str, where: str, comp: dict) -> object:
    """Build one component of a policy as FLARE will (class path + args), so a typo stops here, not in a job."""
    class_path, args = comp.get("path"), comp.get("args", {})
    if not isinstance(class_path, str) or "." not in class_path:
        raise PolicyInstallError(f"{path}: {where} has no class 'path'. Fix: name the class, e.g. {ENFORCER_CLASS}.")
    module_name, class_name = class_path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise PolicyInstallError(f"{path}: {where}: no class {class_path!r} in the installed runtime. Fix the path "
                                 "(a typo?).") from None
    if not isinstance(args, dict):
        raise PolicyInstallError(f"{path}: {where}: 'args' must be an object. Fix the file.")
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise PolicyInstallError(f"{path}: {where} ({class_name}): {err}. Fix its args.") from None


def read_policy(path: str) -> dict:
    """A site's privacy.json, parsed and checked as FLARE will use it: its keys, its scopes and default scope, and
    every filter and component built with its arguments. PolicyInstallError (one line) if it is not usable."""
    policy = _read_json(path, "policy file")
    unknown = sorted(set(policy) - POLICY_KEYS)
    if unknown:
        raise PolicyInstallError(f"{path}: unknown key(s) {unknown}; a privacy.json has {sorted(POLICY_KEYS)}. "
                                 "Fix the name (a misspelt 'components' would drop the site's enforcer).")
    scopes = policy.get("scopes")
    if not isinstance(scopes, list) or not scopes:
        raise PolicyInstallError(f"{path}: a privacy.json needs a 'scopes' list. Fix: start from a shipped policy "
                                 f"({', '.join(SHIPPED_POLICIES)}).")
    names = [s.get("name") for s in scopes if isinstance(s, dict)]
    if policy.get("default_scope") is not None and policy["default_scope"] not in names:
        raise PolicyInstallError(f"{path}: default_scope {policy['default_scope']!r} names no scope (scopes: "
                                 f"{names}). Fix: name one of them.")
    for scope in scopes:
        for kind in ("task_result_filters", "task_data_filters"):
            for i, comp in enumerate(scope.get(kind, [])):
                _build(path, f"scope {scope.get('name')!r} {kind}[{i}]", comp)
    for comp in policy.get("components", []):
        _build(path, f"component {comp.get('id')!r}", comp)
    return policy


def site_enforcer(policy: dict) -> dict | None:
    """The policy's WireContractEnforcer component (None: the site has no last word of its own)."""
    return next((c for c in policy.get("components", []) if c.get("path") == ENFORCER_CLASS), None)


def _local(kit_dir: str) -> str:
    local = os.path.join(kit_dir, "local")
    if not (os.path.isdir(local) and os.path.isdir(os.path.join(kit_dir, "startup"))):
        raise PolicyInstallError(f"{kit_dir}: no startup/ and local/ folders, so this is not a startup kit. Fix: "
                                 "give the folder that holds them.")
    return local


def is_server_kit(kit_dir: str) -> bool:
    return os.path.isfile(os.path.join(kit_dir, "startup", "fed_server.json"))


def _current(local: str, name: str) -> dict | None:
    """local/<name>, else FLARE's provisioned local/<name>.default, else None."""
    for candidate in (name, name + ".default"):
        path = os.path.join(local, candidate)
        if os.path.isfile(path):
            return _read_json(path, candidate)
    return None


def allow_list(kit_dir: str) -> dict:
    """The kit's resources with class_allow_list = the kit's (or NVFlare's default) + FedOPAL's - NOT_ALLOWED, and,
    in a site's kit (not the server's), allow_log_streaming false."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    resources = _current(_local(kit_dir), RESOURCES_FILE) or {"format_version": 2}
    allow = list(resources.get("class_allow_list") or DEFAULT_CLASS_ALLOW_LIST)
    resources["class_allow_list"] = [c for c in allow if c not in NOT_ALLOWED] + [
        c for c in FEDOPAL_JOB_CLASSES if c not in allow]
    if not is_server_kit(kit_dir):
        resources["allow_log_streaming"] = False
    return resources


def no_byoc(kit_dir: str) -> dict:
    """The kit's authorization with every role's rights kept, except `byoc`, which no one has."""
    local = _local(kit_dir)
    authz = _current(local, AUTHZ_FILE)
    if authz is None or not isinstance(authz.get("permissions"), dict):
        raise PolicyInstallError(f"{local}: no authorization.json(.default) with 'permissions'. Fix: give a site's "
                                 "provisioned startup kit (an admin's kit has none).")
    for role, rights in authz["permissions"].items():
        if isinstance(rights, str):  # "any" / "none" for every right
            rights = {right: rights for right in RIGHTS}
        rights["byoc"] = "none"
        authz["permissions"][role] = rights
    return authz


def install_site_policy(kit_dir: str, policy: str | None, deny_byoc: bool = False) -> list[str]:
    """Check everything, then write the kit's privacy.json (when a policy is given: a shipped name or a file),
    resources.json and, with deny_byoc, authorization.json; returns the paths written."""
    local = _local(kit_dir)
    if is_server_kit(kit_dir) and (policy or deny_byoc):
        raise PolicyInstallError(f"{kit_dir}: this is the server's kit; a privacy policy and --deny-byoc are a "
                                 "site's. Fix: give the server's kit no option (it needs the allow-list only).")
    files = {}
    if policy:
        files[POLICY_FILE] = read_policy(shipped_policy(policy) if policy in SHIPPED_POLICIES else policy)
    files[RESOURCES_FILE] = allow_list(kit_dir)
    if deny_byoc:
        files[AUTHZ_FILE] = no_byoc(kit_dir)
    written = []
    for name, content in files.items():  # only now: nothing is written unless everything was usable
        path = os.path.join(local, name)
        with open(path, "w") as f:
            json.dump(content, f, indent=2)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kit", help="a startup kit folder (holds startup/ and local/): a site's, or the server's")
    p.add_argument("--policy", help=f"the site's privacy.json, or a policy that ships with the runtime: "
                                    f"{', '.join(SHIPPED_POLICIES)}; the server's kit needs none")
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
    if args.policy and not site_enforcer(json.load(open(written[0]))):
        print("note: the policy names no WireContractEnforcer: this site has no last word of its own on what leaves "
              "(docs/privacy.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
