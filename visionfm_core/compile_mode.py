"""The `compile` setting's values (`auto | on | off`), checked without importing torch: the run config and
the command lines read it before anything trains (visionfm_core/compile.py does the compiling)."""

from __future__ import annotations

from visionfm_core.errors import ConfigError

COMPILE_MODES = ("auto", "on", "off")


def check_compile_mode(value: object, field: str = "compile") -> str:
    """The compile setting as one of COMPILE_MODES; a ConfigError naming `field` otherwise."""
    text = str(value).strip().lower()
    aliases = {"true": "on", "false": "off", "1": "on", "0": "off", "yes": "on", "no": "off"}
    text = aliases.get(text, text)
    if text not in COMPILE_MODES:
        raise ConfigError(field, f"must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return text
