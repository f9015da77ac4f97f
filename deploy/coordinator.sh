#!/usr/bin/env bash
# Start the fedsynth SuperLink (Flower 1.39): Fleet API (gRPC, TLS) for the sites,
# Control API (HTTPS) for the `flwr` CLI bound to 127.0.0.1 only (it has no
# authentication in open-source Flower), SuperNode authentication on, SQLite state.
# Usage: deploy/coordinator.sh            (settings from the environment, see coordinator.env.example)
set -euo pipefail
: "${FEDSYNTH_PKI:?directory written by fedsynth-coordinator pki}"
: "${FEDSYNTH_STATE_DB:?path of the SuperLink SQLite database}"
: "${FEDSYNTH_COORD_RUN_DIR:?where checkpoints and the consortium summary go}"
FLEET_ADDRESS="${FEDSYNTH_FLEET_ADDRESS:-0.0.0.0:9092}"   # what the sites dial
CONTROL_PORT="${FEDSYNTH_CONTROL_PORT:-9093}"              # local CLI only
export FEDSYNTH_COORD_RUN_DIR
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME="${FLWR_HOME:-$HOME/.fedsynth-flwr}"
unset FLWR_INTERNAL_GRPC_CONTROL_API   # would open an old gRPC Control API on 0.0.0.0:9093
# The SuperLink starts flower-superexec by name: the venv's bin/ must be on PATH.
exec flower-superlink \
  --ssl-ca-certfile "$FEDSYNTH_PKI/ca.crt" \
  --ssl-certfile "$FEDSYNTH_PKI/server.pem" \
  --ssl-keyfile "$FEDSYNTH_PKI/server.key" \
  --fleet-api-type grpc-rere --fleet-api-address "$FLEET_ADDRESS" \
  --host 127.0.0.1 --port "$CONTROL_PORT" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$FEDSYNTH_STATE_DB"
