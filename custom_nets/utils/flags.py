"""Boolean switches read from a config or the command line.

``python -m monai.bundle run ... --overwrite false`` hands the config the *string* ``'false'``
(fire turns only ``False``/``True`` into booleans), and ``bool('false')`` is True. Every switch of
the bundles therefore goes through :func:`as_bool`, which reads the usual spellings and refuses
anything else, naming the config id.
"""

from __future__ import annotations

from custom_nets.utils.errors import InputError

TRUE_WORDS = ("1", "true", "yes", "on", "y", "t")
FALSE_WORDS = ("0", "false", "no", "off", "n", "f", "", "none", "null")


def as_bool(value: bool | str | int | float | None, name: str = "switch") -> bool:
    """A switch's truth value: booleans and numbers as Python reads them; strings by their word.

    Args:
        value: ``True``/``False``, ``0``/``1``, ``None`` (off), or a string such as ``"true"``,
            ``"False"``, ``"0"``, ``"no"``, ``"on"`` (any case, surrounding spaces ignored).
        name: the config id the value came from, for the error message.

    Returns:
        The boolean.

    Raises:
        InputError: a string that is not one of :data:`TRUE_WORDS` / :data:`FALSE_WORDS`.
    """
    if value is None:
        return False
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise InputError(name, f"expected true/false (or yes/no, 1/0, on/off), got {value!r}")
    return bool(value)


__all__ = ["FALSE_WORDS", "TRUE_WORDS", "as_bool"]
