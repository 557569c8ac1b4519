"""Draft training: torchrun DDP over the target cache."""
