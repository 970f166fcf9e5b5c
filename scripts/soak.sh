#!/usr/bin/env bash
# The convergence checker's long run: rounds of seeded multi-node workloads with faults, each
# judged by the oracle (tests/convergence). Exit 0 when every invariant held; otherwise non-zero,
# printing the failing seed, the invariant and the command that replays it.
#
#   scripts/soak.sh --minutes N [--seed S] [--nodes K] [--profile P[,P2…]|every] [--embedded]
#
# The default profile is `all` (every table shape, value and operation, with kills, SIGSTOPs,
# nats-server restarts and a held write lock); `every` cycles through all profiles.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=""
ARGS=()
PROFILE="all"
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes|-minutes) MINUTES="$2"; shift 2 ;;
    --seed|-seed|--nodes|-nodes|--seconds|-seconds) ARGS+=("--${1#"${1%%[!-]*}"}" "$2"); shift 2 ;;
    --profile|-profile) PROFILE="$2"; shift 2 ;;
    --embedded|-embedded|--keep|-keep|-v|--verbose) ARGS+=("$1"); shift ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$MINUTES" ]; then
  echo "soak.sh: --minutes N is required" >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q -e '.[test]'
fi
exec .venv/bin/python -m tests.convergence --minutes "$MINUTES" --profile "$PROFILE" "${ARGS[@]}"
