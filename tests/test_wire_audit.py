"""The wire audit in real simulator runs: every method (tiny ViT, 2 sites, one round) sends exactly what the wire
contract and the job's policy allow, and no personal tensor; the server's recorder is the witness."""

import pytest

from fedopal.specs.contract import policy_for_job
from fedopal.specs.methods import METHODS, get_method
from fedopal.tools.job import simulate
from fedopal.tools.report import wire_fields, wire_log

from conftest import tiny_config

pytestmark = pytest.mark.slow


def audit(job_ws, cfg, policy=None):
    """The recorder's log of a finished job, audited; fails on any violation. Returns the audit."""
    spec = get_method(cfg.train.method, cfg.model.head)
    policy = policy or policy_for_job(spec.shared, cfg.privacy.enabled, cfg.privacy.allow_fields)
    lines = wire_log(job_ws)
    assert lines, f"{job_ws}: the recorder saw nothing"
    result = wire_fields(lines, policy)
    assert result["violations"] == [], result["violations"][:5]
    tensors = {f["name"] for f in result["fields"] if f["where"] == "tensor"}
    assert tensors == set(spec.shared), (tensors, spec.shared)  # the shared groups, all of them, nothing else
    if cfg.privacy.enabled:  # nothing un-noised that is derived from the data, unless the policy names it
        assert not [f for f in result["fields"] if f["dp"] == "site allows" and not policy.allows(
            f["where"], f["name"], f["task"])]
    return result


# One method per distinct wire: feddpa sends what dual_lora sends (same shared groups, no regularizer), fedopal_r what
# fedopal_p and fedopal_w (below) send (same shared groups, a regularizer: the diagnostics); the others differ.
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("late_join", "fedopal_w", "feddpa", "fedopal_r")])
def test_every_method_sends_what_the_contract_allows(small_federation, tmp_path, method):
    root, _ = small_federation
    cfg = tiny_config(root, method=method, num_rounds=1, local_steps=1)
    cfg = cfg.model_copy(update={"name": f"wire_{method}"})
    result = audit(simulate(cfg, str(tmp_path / "ws")), cfg)
    assert result["messages"]["train"] == 2
    tags = {f["name"] for f in result["fields"] if f["where"] == "event_tag"}
    assert "train/task_loss" in tags  # without DP the job's policy lets the tracking through
    assert ("diagnostics/overlap_A" in tags) == (get_method(method).regularizer != "none" or method in (
        "dual_lora", "feddpa"))  # only methods with two adapters have them
