#!/usr/bin/env bash
# The test suite (slow runs and benchmarks are marked and left out). Extra arguments go to pytest.
DOPT_EXTRAS="dev"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m pytest "$@"
