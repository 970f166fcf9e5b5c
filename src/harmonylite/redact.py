"""Credentials out of text: URLs and query strings are redacted before they reach a log line, a
metric label or an error message (used by every layer, so it depends on nothing).
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:secret|password|passwd|pass|pwd|token|session_token|access_token"
    r"|sig|signature|x-amz-signature|x-amz-security-token|x-amz-credential)=)[^&#\s'\"]*",
    re.IGNORECASE,
)
REDACTED = "***"
# NATS takes a token as the whole user part: ``nats://TOKEN@host``.
_NATS_TOKEN = re.compile(r"(?P<scheme>(?:nats|tls|ws|wss)://)[^:/@\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """Remove passwords and secrets from every URL in ``text``.

    ``sftp://user:pass@host/p`` becomes ``sftp://user:***@host/p`` and ``?login=u&secret=p``
    becomes ``?login=u&secret=***``; a NATS token URL ``nats://TOKEN@host`` becomes
    ``nats://***@host``.
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _NATS_TOKEN.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{REDACTED}", text)
