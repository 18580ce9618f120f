"""Transfer compression: NVFlare's own ModelQuantizer (site) and ModelDequantizer (server) filters.

`federation.quantization` picks NVFlare's mode: float16, blockwise8 (8-bit blockwise, bitsandbytes), float4 or
normfloat4 (4-bit, bitsandbytes). The site quantizes what it sends on the `train` task; the server dequantizes it
back to the source dtype (float32) before the aggregator sees it, so the global model is averaged, kept and saved in
float32.

Two thin subclasses, and why they exist:
- NVFlare 2.9's filters move every tensor to the GPU (`.cuda()`) for the 8- and 4-bit modes, so as released they
  cannot run on a site or server without CUDA (FedOPAL's server never needs a GPU). bitsandbytes >= 0.46 quantizes
  on the CPU too, so on a machine where torch sees no CUDA device, `Tensor.cuda` is made the identity for the
  duration of NVFlare's own (de)quantization routine: on such a machine it could only have raised. With a GPU,
  nothing is changed.
- The server-side filter records the bytes that crossed the wire (quantized values + quantization state) in the
  result's meta (WIRE_BYTES_KEY), which the aggregator writes to fedopal_updates.jsonl, before dequantizing.
"""

from __future__ import annotations

import contextlib
import threading

from nvflare.apis.dxo import DXO, MetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

from fedopal.specs.contract import WIRE_BYTES_KEY

QUANTIZATION_MODES = ("float16", "blockwise8", "float4", "normfloat4")
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """On a machine where torch sees no CUDA device, Tensor.cuda returns the tensor itself while inside; elsewhere
    (a GPU is there) this does nothing."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    with _PATCH_LOCK:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        try:
            yield
        finally:
            torch.Tensor.cuda = original


def _nbytes(value) -> int:
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    return 0


def wire_bytes(dxo: DXO) -> int:
    """Bytes of a (possibly quantized) DXO's tensors plus its quantization state (absmax, code, quant_map)."""
    data = sum(_nbytes(v) for v in (dxo.data or {}).values())
    state = dxo.get_meta_prop("quant_state") or {}
    return data + sum(_nbytes(s) for s in state.values())


class SiteQuantizer(ModelQuantizer):
    """NVFlare's ModelQuantizer, runnable without CUDA. quantization_type: one of QUANTIZATION_MODES."""

    def quantization(self, params: dict, fl_ctx: FLContext):
        with cuda_calls_stay_on_cpu():
            return super().quantization(params, fl_ctx)


class ServerDequantizer(ModelDequantizer):
    """NVFlare's ModelDequantizer, runnable without CUDA; records the bytes received before dequantizing. A result
    that was not quantized (no quantization meta) passes unchanged."""

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        received = wire_bytes(dxo)
        if not dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM):
            dxo.set_meta_prop(WIRE_BYTES_KEY, received)
            return dxo
        out = super().process_dxo(dxo, shareable, fl_ctx)
        out.set_meta_prop(WIRE_BYTES_KEY, received)
        return out

    def dequantization(self, params, quant_state, quantization_type, source_datatype, fl_ctx):
        with cuda_calls_stay_on_cpu():
            return super().dequantization(params, quant_state, quantization_type, source_datatype, fl_ctx)
