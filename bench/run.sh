#!/usr/bin/env bash
# Runs the wal_listener benchmark suite on this machine: prints a markdown
# table and writes bench/results.md, bench/results.json and bench/results.png.
#
#   WL_BENCH_SKIP_INSTALL=1  use the installed extension (skip setup.sh, install.sh 15)
#   WL_BENCH_SCALE=0.1       scale the workload sizes (default 1)
#   WL_BENCH_CRITERION=0     skip the Criterion decode+encode benchmark
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/env.sh  # PATH with cargo, WL_VENV
VENV="$WL_VENV"
MATPLOTLIB_VERSION=3.11.2

if [[ "${WL_BENCH_SKIP_INSTALL:-0}" != 1 ]]; then
    bash scripts/setup.sh
    bash scripts/install.sh 15
fi
if [[ "$("$VENV/bin/python" -c 'import matplotlib; print(matplotlib.__version__)' 2>/dev/null)" != "$MATPLOTLIB_VERSION" ]]; then
    "$VENV/bin/pip" install --quiet "matplotlib==$MATPLOTLIB_VERSION"
fi
cargo build --release --quiet -p wal_listener_core --example nats_baseline
"$VENV/bin/python" bench/bench.py
# publish() next to an outbox insert on the write path (bench/publish_results.md).
exec "$VENV/bin/python" bench/publish_bench.py
