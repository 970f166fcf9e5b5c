#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: creates .venv, installs the package with its test
# extra, installs OpenSSH's server (for the SFTP store tests) when missing, then lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
  else
    echo "note: /usr/sbin/sshd missing and not root; SFTP tests against OpenSSH will be skipped" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v -E '^(WARNING|  )' || true
.venv/bin/python -c 'import harmonylite, nats, boto3, asyncssh, wsgidav, hypothesis' 

echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
