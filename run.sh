#!/usr/bin/env bash
# The project's one entry point. Each command sets up .venv on first use (and again whenever
# pyproject.toml changes), so a fresh machine needs nothing before it.
#
#   ./run.sh demo [options]   the main job: python -m torch_port demo (see --help)
#   ./run.sh test [args]      ruff, then pytest over tests/ and derivations/ (args go to pytest)
#   ./run.sh setup            only create/refresh .venv
#
# Environment: TORCH_SPEC (default torch==2.13.0, the CPU wheel this project's machines carry;
# set e.g. TORCH_SPEC='torch>=2.1' elsewhere), VENV (default .venv), HYPOTHESIS_PROFILE
# (dev by default; ci in CI; thorough for deep local runs).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.install-stamp"
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        # torch first, pinned, so the package's own open range (torch>=2.1) is already satisfied
        # and pip never goes looking for a multi-GB CUDA build.
        "$PY" -m pip install --quiet "$TORCH_SPEC"
        "$PY" -m pip install --quiet -e ".[test,demo]"
        echo "$want" >"$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    test)
        setup
        "$PY" -m ruff check .
        "$PY" -m pytest -q "$@"
        ;;
    demo)
        setup
        "$PY" -m torch_port demo "$@"
        ;;
    *)
        echo "usage: ./run.sh {demo|test|setup} [args]" >&2
        exit 2
        ;;
esac
