"""FedOPAL: personalized federated fine-tuning with orthogonal global/personal LoRA adapters on NVIDIA FLARE."""

__version__ = "0.2.0"

import logging as _logging

# bitsandbytes (NVFlare's 8/4-bit quantizers) warns on every import, on CPUs with AVX512-BF16, that an optional kernel
# package ("kernels") is missing; its own fallback is used and nothing changes for FedOPAL. Kept out of every console.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
