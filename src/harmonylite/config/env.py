"""``${NAME}`` environment references in the configuration file's strings."""

from __future__ import annotations

import re
import typing
from typing import Any

from harmonylite.errors import ConfigError

# ``${NAME}`` in a string value is replaced by the environment variable NAME when the file is
# loaded, so secrets (S3 keys, NATS passwords, SFTP/WebDAV URLs) need not be written in it.
# ``$${`` stands for a literal ``${``.
_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def expand_env(data: Any, env: typing.Mapping[str, str], key: str = "") -> Any:
    """``data`` with every ``${NAME}`` in its strings replaced from ``env``; a reference to an
    unset variable (or a malformed one) is an error naming the key and the variable."""
    if isinstance(data, dict):
        return {k: expand_env(v, env, f"{key}.{k}" if key else k) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, env, key) for v in data]
    if not isinstance(data, str) or "${" not in data:
        return data

    def one(m: re.Match[str]) -> str:
        if m[1]:  # $${...}: written literally
            return "${" + m[2] + "}"
        name = m[2]
        if not _ENV_NAME.match(name):
            raise ConfigError(key, m[0], "refers to an environment variable with an invalid "
                              "name (use ${NAME}: letters, digits and _; $${ for a literal ${)")
        if name not in env:
            raise ConfigError(key, m[0], f"refers to environment variable {name}, which is not "
                              "set")
        return env[name]

    return _ENV_REF.sub(one, data)
