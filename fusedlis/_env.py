"""Reading the boolean FUSEDLIS_* switches one way everywhere."""

from __future__ import annotations

import os

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def env_flag(name: str, default: bool) -> bool:
    """The switch `name`: 1/on/true/yes or 0/off/false/no, any case; unset or empty gives `default`.

    Anything else raises ValueError naming the variable, so a typo is not silently read as on or off.
    """
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of {'/'.join(_ON)} or {'/'.join(_OFF)}")
