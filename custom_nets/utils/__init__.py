"""Checkpoints and the stage contract, atomic file writing (JSON, NIfTI), config values, DDP helpers, error types and visualisation helpers."""
