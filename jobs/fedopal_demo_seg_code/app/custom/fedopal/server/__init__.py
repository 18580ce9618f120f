"""What runs on the FLARE server: the global model (shared tensors only, no foundation model), the validating
aggregator, the FedAvg controller and the wire recorder. No GPU, no backbone weights."""
