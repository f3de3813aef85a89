"""Values that arrive as strings from configs and the command line."""

from __future__ import annotations

from pathlib import Path

__all__ = ["as_path"]


def as_path(value: str | Path | None) -> Path | None:
    """A path from a config or the command line; None, "", "none" and "null" (any case) mean no path.

    Args:
        value: the config value.

    Returns:
        The path, or None when the value means "no path".
    """
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return Path(value)
