#!/usr/bin/env bash
# Container entrypoint: render the front's configs from the environment, start supervisord (model server
# first, nginx once the model is ready), then hand over to "$@" - on Modal that is the function runner.
# With no arguments (plain `docker run`), supervisord itself stays in the foreground.
set -euo pipefail

PYTHON="${DIFFUSERVE_PYTHON:-python3}"
RUN_DIR="${DIFFUSERVE_RUN_DIR:-/run/diffuserve}"
export DIFFUSERVE_RUN_DIR="$RUN_DIR"

"$PYTHON" -m diffuserve.deploy.render --out "$RUN_DIR"

if [ "$#" -eq 0 ]; then
    exec supervisord -c "$RUN_DIR/supervisord.conf"
fi
supervisord -c "$RUN_DIR/supervisord.conf" &
exec "$@"
