#!/usr/bin/env bash
# Runs the test suite; see CONTRIBUTING.md.
#
#   scripts/test.sh                       everything: lint, types, every test (what CI runs)
#   scripts/test.sh --quick               lint, types, unit and property tests (no servers)
#   scripts/test.sh tests/unit -k config  lint, types, then pytest with these arguments
#
# On a fresh machine it creates .venv, installs the package with its test extra (with uv when it
# can, else pip; again only when pyproject.toml changes) and the Debian packages some tests need
# (OpenSSH's server, Chromium, Prometheus) when missing. Tests run on HARMONYLITE_TEST_WORKERS
# pytest-xdist workers (default 6; 2 with --quick; none, in one process, when pytest arguments are
# given without -n).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
named=0  # tests named on the command line (a path, or path::test)
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then
    quick=1
  else
    args+=("$a")
    if [[ "$a" != -* ]] && [ -e "${a%%::*}" ]; then named=1; fi
  fi
done

# Debian packages the server tests use: OpenSSH's server (SFTP store), Chromium (the live page,
# driven by Playwright), Prometheus's promtool (the alert rules in deploy/monitoring).
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
if [ "$quick" = 0 ] && [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: ${missing[*]} missing and not root; the tests needing them will be skipped" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Install when the declared dependencies changed since the last install into this venv.
stamp=.venv/.harmonylite-test-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # uv resolves and installs in parallel: about a minute less than pip on a fresh clone.
  if [ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q uv >/dev/null 2>&1; then
    .venv/bin/uv pip install -q --python .venv/bin/python -e '.[test]'
  else
    echo "note: uv not installable; installing with pip" >&2
    .venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v -E '^(WARNING|  )' || true
  fi
  .venv/bin/python -c 'import harmonylite, nats, boto3, asyncssh, wsgidav, hypothesis, xdist, aiohttp, playwright'
  echo "$want" > "$stamp"
fi

echo "== ruff"
.venv/bin/ruff check src tests bench

# mypy runs beside pytest (the tests mostly wait on servers and node processes); its report is
# printed when it ends, and a type error fails the run as before.
mypy_out=$(mktemp)
trap 'rm -f "$mypy_out"' EXIT
.venv/bin/mypy >"$mypy_out" 2>&1 &
mypy_pid=$!

# Six workers for the whole suite: its tests mostly wait on servers and node processes. Two for
# the quick loop: unit and property tests keep a core busy each. Tests named on the command line
# run in this process (starting workers costs more than a few tests) unless -n is given too.
if [ "$quick" = 1 ]; then
  default_workers=2
elif [ "$named" = 1 ]; then
  default_workers=0
else
  default_workers=6
fi
workers=${HARMONYLITE_TEST_WORKERS:-$default_workers}
# Each test goes to whichever worker is free, the longest first; a module whose tests share one
# cluster in order goes whole to one worker (tests/conftest.py: SHARED_CLUSTER_MODULES).
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15)
if [ "$workers" != 0 ]; then
  pytest+=(-n "$workers")
fi
if [ "$quick" = 1 ]; then
  pytest+=(tests/unit)
fi

echo "== pytest (workers: ${workers})"
status=0
"${pytest[@]}" "${args[@]}" || status=$?

echo "== mypy"
mypy_status=0
wait "$mypy_pid" || mypy_status=$?
cat "$mypy_out"
if [ "$mypy_status" != 0 ]; then
  exit "$mypy_status"
fi
exit "$status"
