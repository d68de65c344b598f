"""The config error every layer raises for a user mistake (the bottom of the package: imports nothing of it).

It lives below moe_train.config so that the modules config asks to check their own settings (each router's
checks in moe_train/routing, the kernels' backend lists) raise the same error with the same wording;
moe_train.config re-exports it.
"""

from __future__ import annotations

from typing import Any, NoReturn


class ConfigError(ValueError):
    """A user mistake in a config: the message names the key, the value and what is allowed."""


def config_fail(key: str, value: Any, allowed: str) -> NoReturn:
    """Raises ConfigError("{key}={value!r} is not allowed: {allowed}"), the one wording of a refused value."""
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
