#!/usr/bin/env bash
# The main job: install what is missing, build and install pgflow, start a throwaway
# PostgreSQL cluster with it (15, or PGFLOW_PG=18), and exercise an example queue and flow end
# to end.
# Running it again starts a fresh cluster.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEMO_DIR=${PGFLOW_DEMO_DIR:-/tmp/pgflow-demo}
DEMO_PORT=${PGFLOW_DEMO_PORT:-5499}

ensure_tools
install_extension
say "starting PostgreSQL $PG_MAJOR in $DEMO_DIR on port $DEMO_PORT"
start_cluster "$DEMO_DIR" "$DEMO_PORT" pgflow_demo

say "running examples/demo.sql"
runuser -u postgres -- "$PGBIN/psql" -h "$DEMO_DIR" -p "$DEMO_PORT" -U postgres -d pgflow_demo \
    -v ON_ERROR_STOP=1 -q -f "$REPO_ROOT/examples/demo.sql"

say "pgflow is running. Connect with:"
echo "    psql -h 127.0.0.1 -p $DEMO_PORT -U postgres pgflow_demo"
echo "Stop it with:"
echo "    runuser -u postgres -- $PGBIN/pg_ctl -D $DEMO_DIR/data stop"
