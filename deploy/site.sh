#!/usr/bin/env bash
# Start one fedsynth site: a SuperNode in process isolation (it runs no app code
# itself) plus the trusted launcher, which runs only this installation's
# client.app and only for the pinned bundle. Both get the SuperExec shared secret
# (FEDSYNTH_SUPEREXEC_SECRET): the SuperNode then accepts task polls from the launcher
# only (Flower 1.39, experimental; see docs/hospital-it.md).
# Usage: deploy/site.sh [both|supernode|launcher]   (settings from the environment, see site.env.example)
#   both (default): start both, stop both when either ends; supernode / launcher: exec only that
#   one (the systemd units fedsynth-supernode@ / fedsynth-launcher@ and compose.site.yml).
# Stop: SIGTERM this script's process group (both children are stopped).
set -euo pipefail
: "${FEDSYNTH_SUPERLINK:?host:port of the coordinator's Fleet API}"
: "${FEDSYNTH_CA_CERT:?the consortium ca.crt}"
: "${FEDSYNTH_DEPLOY_KEY:?this site's OpenSSH ECDSA private key (0600)}"
: "${FEDSYNTH_DEPLOY_SITE_ID:?site id, e.g. site-a}"
: "${FEDSYNTH_DATA_DIR:?site data dir: notes.jsonl, output/}"
: "${FEDSYNTH_PIN:?pin file written by python -m client.launcher pin}"
: "${FEDSYNTH_INSTALL_DIR:?directory holding the installed client/ shared/ packages}"
: "${FEDSYNTH_SUPEREXEC_SECRET:?file with the Runtime API shared secret (head -c 32 /dev/urandom, 0600)}"
RUNTIME_PORT="${FEDSYNTH_RUNTIME_PORT:-9094}"   # SuperNode Runtime API, 127.0.0.1 only
AUDIT_LOG="${FEDSYNTH_AUDIT_LOG:-$FEDSYNTH_DATA_DIR/audit.jsonl}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME="${FLWR_HOME:-$HOME/.fedsynth-flwr}"
PY="${FEDSYNTH_PYTHON:-python}"
ROLE="${1:-both}"

supernode() {
  exec flower-supernode \
    --superlink "$FEDSYNTH_SUPERLINK" \
    --root-certificates "$FEDSYNTH_CA_CERT" \
    --auth-supernode-private-key "$FEDSYNTH_DEPLOY_KEY" \
    --isolation process \
    --superexec-auth-secret-file "$FEDSYNTH_SUPEREXEC_SECRET" \
    --host 127.0.0.1 --port "$RUNTIME_PORT" \
    --node-config "data-dir='$FEDSYNTH_DATA_DIR' site-id='$FEDSYNTH_DEPLOY_SITE_ID'"
}
launcher() {
  cd "$FEDSYNTH_INSTALL_DIR" && exec "$PY" -m client.launcher serve \
    --runtime-api-address "127.0.0.1:$RUNTIME_PORT" --insecure \
    --pin "$FEDSYNTH_PIN" --audit-log "$AUDIT_LOG" --site "$FEDSYNTH_DEPLOY_SITE_ID" \
    --superexec-auth-secret-file "$FEDSYNTH_SUPEREXEC_SECRET"
}
case "$ROLE" in
  supernode) supernode ;;
  launcher) launcher ;;
  both) ;;
  *) echo "usage: $0 [both|supernode|launcher]" >&2; exit 2 ;;
esac

supernode &
SUPERNODE=$!
launcher &
LAUNCHER=$!
trap 'kill -TERM $SUPERNODE $LAUNCHER 2>/dev/null; wait' TERM INT
# Either one ending (e.g. the SuperNode after revocation) stops the site.
wait -n $SUPERNODE $LAUNCHER || true
kill -TERM $SUPERNODE $LAUNCHER 2>/dev/null || true
wait
