"""Error types that name the offending file and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input (image, label, datalist, cache, config value).

    The message always starts with the file (or config id) at fault so that a user can find it.

    Args:
        source: the file path or config id that is wrong.
        problem: what is wrong with it, in words.
    """

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class InputErrors(InputError):
    """Several :class:`InputError` found in one pass (e.g. while validating a datalist).

    A subclass of :class:`InputError`, so callers catch one type; ``errors`` holds each problem.
    """

    def __init__(self, errors: list[InputError]) -> None:
        self.errors = list(errors)
        self.source = ", ".join(dict.fromkeys(e.source for e in self.errors))
        self.problem = f"{len(self.errors)} problem(s)"
        lines = "\n".join(str(e) for e in self.errors)
        ValueError.__init__(self, f"{len(self.errors)} problem(s):\n{lines}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, from the wrong stage, or does not match the configured network."""
