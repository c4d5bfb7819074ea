"""Runtimes move tensors between stages; the stages themselves learn (see stage.py)."""
