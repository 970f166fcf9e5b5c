"""nats-server configuration files: read one, lay it over the generated one, write the result.

HarmonyLite builds its embedded server's options from its flags (`bind_address`, `-cluster-addr`,
`-cluster-peers`, `-leaf-servers`) and then processes `nats.server_config` on top of them, setting
each option the file names. We do the same with a child process: the file is parsed here, merged
key by key over the generated configuration (the file wins where both give a value, which is
HarmonyLite's order, and each such conflict is reported), and the merged result is written as one
configuration file. Merging ourselves, instead of an `include` at the end, keeps the fields of a
block the file only partly gives (a `jetstream {}` block without `store_dir`, a `cluster {}` block
without `routes`) and lets the conflicts be named.

The reader covers the configuration syntax nats-server documents: `key = value`, `key: value` or
`key value`; `{}` blocks and `[]` arrays; quoted and bare strings; comments with `#` or `//`;
`include` (relative to the including file). Bare values (numbers, sizes such as `50M`, booleans,
durations, `$variables`) are kept as written and written back unquoted, so nats-server reads them
exactly as it would have read the original.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonylite.errors import NatsError


@dataclass(frozen=True)
class Raw:
    """A bare value, written back as it was written (nats-server types it)."""

    text: str


_BARE_STOP = set(",;}]#\n\r")


class _Reader:
    def __init__(self, text: str, path: Path, depth: int) -> None:
        self.text, self.path, self.depth, self.i = text, path, depth, 0

    def fail(self, what: str) -> NatsError:
        line = self.text.count("\n", 0, self.i) + 1
        return NatsError(f"cannot read nats.server_config {self.path} (line {line}): {what}")

    def skip(self, newlines: bool = True) -> None:
        t = self.text
        while self.i < len(t):
            c = t[self.i]
            if c == "#" or t.startswith("//", self.i):
                end = t.find("\n", self.i)
                self.i = len(t) if end < 0 else end
            elif c in " \t" or (newlines and c in "\r\n,;"):
                self.i += 1
            else:
                return

    def read_map(self, closing: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            self.skip()
            if self.i >= len(self.text):
                if closing is not None:
                    raise self.fail(f"missing {closing!r}")
                return out
            if closing is not None and self.text[self.i] == closing:
                self.i += 1
                return out
            key = self.read_key()
            self.skip(newlines=False)
            if self.i < len(self.text) and self.text[self.i] in "=:":
                self.i += 1
                self.skip(newlines=False)
            if key.lower() == "include":
                out.update(self.include(self.read_value()))
                continue
            out[key] = self.read_value()

    def read_key(self) -> str:
        if self.text[self.i] in "\"'":
            return self.read_quoted()
        m = re.compile(r"[^\s=:{}\[\],;#]+").match(self.text, self.i)
        if m is None:
            raise self.fail(f"unexpected {self.text[self.i]!r}")
        self.i = m.end()
        return m.group()

    def read_quoted(self) -> str:
        quote = self.text[self.i]
        if quote == '"':
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(self.text, self.i)
            if m is None:
                raise self.fail("unterminated string")
            self.i = m.end()
            return str(json.loads(m.group()))
        end = self.text.find("'", self.i + 1)
        if end < 0:
            raise self.fail("unterminated string")
        value = self.text[self.i + 1:end]
        self.i = end + 1
        return value

    def read_value(self) -> Any:
        if self.i >= len(self.text):
            raise self.fail("a key without a value")
        c = self.text[self.i]
        if c == "{":
            self.i += 1
            return self.read_map("}")
        if c == "[":
            self.i += 1
            items: list[Any] = []
            while True:
                self.skip()
                if self.i >= len(self.text):
                    raise self.fail("missing ']'")
                if self.text[self.i] == "]":
                    self.i += 1
                    return items
                items.append(self.read_value())
        if c in "\"'":
            return self.read_quoted()
        if self.text.startswith("<<", self.i):
            raise self.fail("heredoc values are not supported; quote the value instead")
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in _BARE_STOP \
                and not self.text.startswith("//", self.i):
            self.i += 1
        token = self.text[start:self.i].strip()
        if not token:
            raise self.fail("a key without a value")
        return Raw(token)

    def include(self, target: Any) -> dict[str, Any]:
        name = target.text if isinstance(target, Raw) else str(target)
        path = Path(name)
        if not path.is_absolute():
            path = self.path.parent / path
        return read_file(path, self.depth + 1)


def read_file(path: Path, depth: int = 0) -> dict[str, Any]:
    """The file's settings as nested dicts; values are str, Raw, lists and dicts."""
    if depth > 10:
        raise NatsError(f"nats.server_config: includes nested too deep at {path}")
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise NatsError(f"nats.server_config file {path} does not exist") from exc
    except OSError as exc:
        raise NatsError(f"cannot read nats.server_config file {path}: {exc}") from exc
    return _Reader(text, path, depth).read_map(None)


def _norm(key: str) -> str:
    return key.lower()


def merge(base: dict[str, Any], over: dict[str, Any], prefix: str = ""
          ) -> tuple[dict[str, Any], list[tuple[str, Any, Any]]]:
    """``over`` laid on ``base`` key by key (keys compare case-insensitively, as nats-server's
    do); returns the result and the conflicts as (dotted key, base value, file value)."""
    out = dict(base)
    by_norm = {_norm(k): k for k in out}
    conflicts: list[tuple[str, Any, Any]] = []
    for key, value in over.items():
        mine = by_norm.get(_norm(key))
        dotted = f"{prefix}{key}"
        if mine is None:
            out[key] = value
            by_norm[_norm(key)] = key
            continue
        old = out.pop(mine)
        if isinstance(old, dict) and isinstance(value, dict):
            merged, inner = merge(old, value, dotted + ".")
            out[key] = merged
            conflicts.extend(inner)
        else:
            out[key] = value
            if not _same(old, value):
                conflicts.append((dotted, old, value))
        by_norm[_norm(key)] = key
    return out, conflicts


def _same(a: Any, b: Any) -> bool:
    def text(v: Any) -> str:
        return v.text if isinstance(v, Raw) else json.dumps(v, default=str)
    return text(a) == text(b) or str(a) == (b.text if isinstance(b, Raw) else str(b))


def render(conf: dict[str, Any]) -> str:
    """nats-server configuration text for ``conf`` (Raw values unquoted)."""
    return "\n".join(f"{json.dumps(k)}: {_value(v, 1)}" for k, v in conf.items()) + "\n"


def _value(v: Any, depth: int) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        pad = "  " * depth
        inner = "\n".join(f"{pad}{json.dumps(k)}: {_value(x, depth + 1)}" for k, x in v.items())
        return "{\n" + inner + "\n" + "  " * (depth - 1) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x, depth + 1) for x in v) + "]"
    if isinstance(v, int | float):
        return json.dumps(v)
    return json.dumps(str(v))


def shown(v: Any) -> str:
    return v.text if isinstance(v, Raw) else json.dumps(v, default=str)


def lookup(conf: dict[str, Any], *keys: str) -> Any:
    """A value by case-insensitive path, or None."""
    node: Any = conf
    for key in keys:
        if not isinstance(node, dict):
            return None
        found = [v for k, v in node.items() if _norm(k) == _norm(key)]
        if not found:
            return None
        node = found[-1]
    return node
