"""The tree shows who runs what, and imports run one way: tools -> site/server -> model/policy -> config -> specs.

Read from the source (every import, at module level or inside a function), not from what happens to be loaded."""

import ast
import os

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "custom", "fedopal")
# layer of each part of the package; a module may import its own part and lower layers only
LAYERS = {"specs": 0, "__init__": 0, "config": 1, "policy": 1, "model": 2, "transfer": 2, "he": 2, "site": 3,
          "server": 3, "tools": 4, "cli": 5, "__main__": 6}
SIBLINGS_APART = {("site", "server"), ("server", "site"), ("policy", "config")}
# the site's own policy: reviewable alone, so it depends on NVFlare, NumPy and fedopal.specs only (Opacus's accountant
# and torch, to give a torch tensor back, are imported where they are used)
POLICY_MODULE_LEVEL = {"nvflare", "numpy", "fedopal", "__future__", "typing", "math", "re", "json", "os", "shutil",
                       "sys", "argparse", "warnings", "fnmatch", "dataclasses", "importlib"}


def modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
                yield path, rel


def part_of(parts: list[str]) -> str:
    return parts[0]


def imports(path):
    """(module imported, at module level?) for every import of the file."""
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package is installed; import fedopal.<part>)"
            out.append((node.module, id(node) in top))
    return out


@pytest.mark.parametrize("path,parts", list(modules()), ids=lambda v: "/".join(v) if isinstance(v, list) else None)
def test_imports_run_one_way(path, parts):
    mine = part_of(parts)
    for name, _ in imports(path):
        if not name.startswith("fedopal.") and name != "fedopal":
            continue
        target = name.split(".")[1] if "." in name else "__init__"
        if target == mine:
            continue
        assert (mine, target) not in SIBLINGS_APART, f"{'/'.join(parts)} imports {name}: {mine} may not use {target}"
        assert LAYERS[target] < LAYERS[mine], (f"{'/'.join(parts)} ({mine}, layer {LAYERS[mine]}) imports {name} "
                                               f"({target}, layer {LAYERS[target]}): imports must run downward")


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(p) for _, p in modules()}
    assert parts <= set(LAYERS), parts - set(LAYERS)


def test_the_site_policy_depends_on_nvflare_numpy_and_the_specs_only():
    for path, parts in modules():
        if part_of(parts) != "policy":
            continue
        for name, top_level in imports(path):
            root = name.split(".")[0]
            if top_level:
                assert root in POLICY_MODULE_LEVEL, f"policy/{parts[-1]}.py imports {name} at module level"
            if root == "fedopal":
                assert name == "fedopal" or name.startswith(("fedopal.specs", "fedopal.policy")), \
                    f"policy/{parts[-1]}.py imports {name}"


def test_the_server_side_never_imports_the_model_or_the_site():
    for path, parts in modules():
        if part_of(parts) == "server":
            for name, _ in imports(path):
                assert not name.startswith(("fedopal.model", "fedopal.site", "peft", "monai", "transformers")), \
                    f"server/{parts[-1]}.py imports {name}"
