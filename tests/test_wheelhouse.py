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


def test_the_wheelhouse_carries_the_runtime_wheel_of_this_version():
    import fedopal

    assert _wheels()["fedopal"] == [fedopal.__version__]


def test_the_runtime_wheel_installs_alone_and_pins_what_the_venv_pins(tmp_path):
    """`make wheel`'s build, here into tmp_path: the wheel holds the whole runtime and the `fedopal` command, its
    dependencies are requirements.txt's pins (test-only ones aside), and installed alone it is this version."""
    import subprocess
    import sys
    import zipfile

    import fedopal

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), REPO], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fedopal-*.whl")
    assert wheel.name == f"fedopal-{fedopal.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("site/client.py", "site/executor.py", "policy/enforcer.py", "specs/contract.py",
                   "server/global_model.py", "cli.py"):
        assert f"fedopal/{module}" in names
    meta = next(n for n in names if n.endswith("METADATA"))
    requires = {_norm(line.split()[1].split("==")[0]): line.split("==")[1].strip()
                for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines() if line.startswith("Requires-Dist")}
    pins = _pins()
    assert requires == {p: v for p, v in pins.items() if p not in ("pytest", "hypothesis")}
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fedopal = fedopal.cli:main" in entry
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import fedopal, fedopal.site.executor as e; "
                            "print(fedopal.__version__, fedopal.__file__, e.SITE_SCRIPT)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    version, path, script = probe.stdout.split()
    assert version == fedopal.__version__ and path.startswith(str(target)) and script.startswith(str(target))
