"""The result filter lets only shared keys leave a site, whatever the site script sent."""

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext

from fedopal.adapters import build_model
from fedopal.filters import SharedOnlyFilter
from fedopal.methods import get_method


def test_filter_strips_personal_and_private_head(tiny_cfg):
    spec = get_method("fedopal_w", "personal")
    model = build_model(tiny_cfg, spec, "site-1")
    everything = {k: v.numpy() for k, v in model.state_dict().items()}
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=everything).to_shareable()
    flt = SharedOnlyFilter(shared_pattern=spec.shared_pattern())
    out = from_shareable(flt.process(shareable, FLContext())).data
    assert set(out) == set(model.shared_state())
    assert not any(".personal." in k or k.startswith("head.") for k in out)
    assert isinstance(flt.shared_pattern, str)  # exported as a string, not a compiled regex


def test_filter_for_local_sends_nothing(tiny_cfg):
    spec = get_method("local")
    model = build_model(tiny_cfg, spec, "site-1")
    shareable = DXO(data_kind=DataKind.WEIGHTS,
                    data={k: np.asarray(v) for k, v in model.state_dict().items()}).to_shareable()
    out = from_shareable(SharedOnlyFilter(spec.shared_pattern()).process(shareable, FLContext())).data
    assert out == {}
