"""FedOPAL: personalized federated fine-tuning with orthogonal global/personal LoRA adapters on NVIDIA FLARE."""

__version__ = "0.1.0"
