"""Training: the LoRA recipe, its checkpoints and its metrics."""
