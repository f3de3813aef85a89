"""Checkpoints, atomic file writing, error types and visualisation helpers."""
