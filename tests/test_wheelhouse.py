"""The air-gapped install: wheelhouse.txt (written by `make wheelhouse`) must hold a wheel of every pin in
requirements.txt at that very version, one version per project, and no source archive (offline, pip could not build
one). Checked without downloading anything."""

import os
import re

from conftest import REPO


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()  # wheel file names use the normalized project name


def _pins() -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(REPO, "requirements.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version
    return pins


def _wheels() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in open(os.path.join(REPO, "wheelhouse.txt")):
        name = line.strip()
        assert name.endswith(".whl"), f"{name}: not a wheel; run `make wheelhouse` (it builds source archives)"
        project, version = name.split("-")[:2]
        found.setdefault(_norm(project), []).append(version)
    return found


def test_every_pin_has_its_wheel_and_no_project_has_two_versions():
    wheels = _wheels()
    for project, version in _pins().items():
        assert project in wheels, f"{project}=={version} is pinned but has no wheel in wheelhouse.txt"
        assert [v.split("+")[0] for v in wheels[project]] == [version], (project, wheels[project], version)
    assert not {p: v for p, v in wheels.items() if len(v) > 1}
    assert "pip" in wheels  # the venv's own pip upgrade needs it too
