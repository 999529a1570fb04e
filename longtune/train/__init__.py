"""LongLoRA / LoRA² fine-tuning on Ray Train: the worker loop, checkpoints, the driver."""
