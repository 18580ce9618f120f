"""The model every site builds: frozen backbone, peft LoRA adapters (global and personal), fused dual-LoRA forward,
orthogonality regularizers, adapter diagnostics. Runs at the sites (and wherever a job is built); never on the
server."""
