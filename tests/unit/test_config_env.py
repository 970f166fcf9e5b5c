from __future__ import annotations

import pytest

from harmonylite.config import expand_env
from harmonylite.errors import ConfigError


def test_references_are_replaced_in_strings_lists_and_tables() -> None:
    env = {"A": "x", "B_2": "y"}
    data = {"s": "pre-${A}-${B_2}", "n": 3, "l": ["${A}", "plain"], "t": {"u": "${B_2}"}}
    assert expand_env(data, env) == {"s": "pre-x-y", "n": 3, "l": ["x", "plain"],
                                     "t": {"u": "y"}}


def test_double_dollar_is_a_literal_and_a_lone_dollar_is_kept() -> None:
    assert expand_env({"p": "a$${A}b$c"}, {}) == {"p": "a${A}b$c"}


@pytest.mark.parametrize(("value", "words"), [
    ("${MISSING}", "environment variable MISSING, which is not set"),
    ("${9bad}", "invalid name"),
])
def test_errors_name_the_dotted_key(value: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        expand_env({"snapshot": {"s3": {"secret": value}}}, {})
    assert err.value.key == "snapshot.s3.secret"
    assert words in str(err.value)
