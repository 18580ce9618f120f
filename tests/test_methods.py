"""Method specs are data: which tensors train, which leave the site."""


import pytest

from fedopal.model.adapters import build_model
from fedopal.specs.methods import GROUPS, METHODS, get_method, group_of


@pytest.mark.parametrize("name", list(METHODS))
def test_personal_adapter_is_never_shared(name):
    spec = get_method(name, "shared")
    assert "personal.A" not in spec.shared and "personal.B" not in spec.shared
    assert set(spec.shared) <= set(spec.trainable) | {"head"}
    assert set(spec.trainable) <= set(GROUPS)


def test_local_sends_nothing():
    spec = get_method("local", "shared")  # the head mode cannot make `local` share anything
    assert spec.shared == () and spec.adapters == ("personal",)


def test_fedavg_lora_shares_global_adapter_and_head():
    spec = get_method("fedavg_lora", "personal")
    assert set(spec.shared) == {"global.A", "global.B", "head"} and spec.adapters == ("global",)


@pytest.mark.parametrize("name,regularizer", [("dual_lora", "none"), ("fedopal_w", "weight"),
                                              ("fedopal_r", "representation")])
def test_dual_methods_follow_head_mode(name, regularizer):
    shared_head = get_method(name, "shared")
    personal_head = get_method(name, "personal")
    assert shared_head.regularizer == regularizer
    assert shared_head.adapters == ("global", "personal")
    assert "head" in shared_head.shared and "head" not in personal_head.shared
    assert "head" in personal_head.kept_on_site


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("head", ["shared", "personal"])
def test_the_shared_groups_are_exactly_the_shared_keys(tiny_cfg, name, head):
    spec = get_method(name, head)
    model = build_model(tiny_cfg, spec, "site-1")
    keys = list(model.state_dict())
    assert {k for k in keys if spec.is_shared(k)} == set(model.shared_state())
    assert all(group_of(k) in spec.shared for k in model.shared_state())


def test_key_groups_are_stable_names():
    assert group_of("backbone.base_model.model.net.blocks.0.attn.qkv.lora_A.global.weight") == "global.A"
    assert group_of("backbone.base_model.model.net._conv_head.lora_B.personal.weight") == "personal.B"
    assert group_of("head.bias") == "head"
    assert group_of("backbone.base_model.model.net._conv_head.base_layer.weight") == "backbone"
