"""`fedopal site-policy KIT_DIR [--policy FILE]`: install a site's own privacy policy in its FLARE startup kit.

The policy's code is the installed fedopal runtime (fedopal.policy, from the wheel the site pinned): nothing is copied.
What is written is the site's configuration: `<kit>/local/privacy.json`, whose scope `fedopal` (also the default
scope) names the site's result filters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


class PolicyInstallError(ValueError):
    """The kit or the policy file cannot be used; the message names the file and the fix."""


def read_policy(path: str) -> dict:
    """A privacy.json, parsed; PolicyInstallError (one line) if it is not one."""
    try:
        with open(path) as f:
            policy = json.load(f)
    except FileNotFoundError:
        raise PolicyInstallError(f"{path}: policy file not found. Fix: give an existing privacy.json.") from None
    except json.JSONDecodeError as err:
        raise PolicyInstallError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}). Fix the syntax.") from None
    if not isinstance(policy, dict) or not isinstance(policy.get("scopes"), list):
        raise PolicyInstallError(f"{path}: a privacy.json needs a 'scopes' list. Fix: start from "
                                 "poc_setup/site_privacy.json.")
    return policy


def install_site_policy(kit_dir: str, policy_file: str) -> str:
    """Copy `policy_file` to <kit_dir>/local/privacy.json; returns that path."""
    local = os.path.join(kit_dir, "local")
    if not os.path.isdir(local):
        raise PolicyInstallError(f"{kit_dir}: no local/ folder, so this is not a site's startup kit. "
                                 "Fix: give the folder that holds startup/ and local/.")
    read_policy(policy_file)
    target = os.path.join(local, "privacy.json")
    shutil.copyfile(policy_file, target)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kit", help="the site's startup kit folder (holds startup/ and local/)")
    p.add_argument("--policy", required=True, help="the site's privacy.json (e.g. poc_setup/site_privacy.json)")
    args = p.parse_args(argv)
    try:
        target = install_site_policy(args.kit, args.policy)
    except PolicyInstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"installed {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
