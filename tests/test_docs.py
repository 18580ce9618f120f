"""Docs that cannot go stale: the README's example tables and docs/configuration.md are exactly what the generator
makes from the committed results and the schema."""

import os
import subprocess
import sys

from fedopal.config import FedOpalConfig
from fedopal.tools.docs import config_rows

from conftest import REPO


def test_the_readme_and_the_configuration_page_are_what_the_generator_makes():
    proc = subprocess.run([sys.executable, "-m", "fedopal.tools.docs", "--check"], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr


def test_every_config_key_is_described_in_the_reference():
    rows = config_rows(FedOpalConfig)
    page = open(os.path.join(REPO, "docs", "configuration.md")).read()
    assert all(description for _, _, _, description in rows), [key for key, *_, d in rows if not d]
    for key, *_ in rows:
        assert f"| `{key}` |" in page
    assert "| `train.device` |" in page and "| `model.fused_adapters` |" in page


def test_the_readme_is_a_guide_a_newcomer_reads_in_minutes():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert len(readme.splitlines()) < 500
    first_screen = "\n".join(readme.splitlines()[:8])
    assert "make demo" in first_screen and "make test" in first_screen
    for link in ("docs/configuration.md", "docs/deploy.md", "docs/data.md", "docs/gpu.md"):
        assert link in readme and os.path.isfile(os.path.join(REPO, link))
