#!/bin/sh
# sealmq-bootstrap: the one-shot `pki` service of docker-compose.yml (see docs/docker.md).
#
# 1. `sealmq bootstrap` creates what is missing in the deployment volume ($SEALMQ_DEPLOY_DIR):
#    the CA, the backend identity, devices dev-001..dev-$SEALMQ_DEVICES, the broker user file,
#    each identity's mqtt.password and the monitor's password. Existing ones are kept.
# 2. Each service then gets only what it needs, copied into its own volume, so that no running
#    container holds the CA key or another party's private key:
#      $SEALMQ_PUBLISH_BACKEND  ca/ca.crt, ca/crl.pem, backend/backend/{key,cert,chain}.pem + mqtt.password,
#                               console.auth (the console password's salted hash; the password itself
#                               stays in $SEALMQ_DEPLOY_DIR/console.password) and console-monitor.password
#                               (the read-only broker user of the console's broker view)
#      $SEALMQ_PUBLISH_DEVICES  ca/ca.crt, ca/crl.pem, devices/<id>/{key,cert,chain}.pem + mqtt.password
#      $SEALMQ_BROKER_DIR       users (salted hashes only), pki/ (ca/ca.crt, ca/crl.pem and the broker's
#                               TLS key and chain: broker/broker/{key,chain}.pem) and mosquitto/
#                               (the generated Mosquitto config, with copies of those TLS files)
#    With SEALMQ_WORKERS=N (the compose file's default is 3; 0: none) also, for the `scale` profile
#    (docs/scaling.md): to $SEALMQ_PUBLISH_BACKEND the share group name (backend/<name>/share-group),
#    the worker accounts' passwords (backend/<name>/workers/<name>-wK.password), the shared session
#    state key (state.key) and the database password as a libpq password file (pgpass); to
#    $SEALMQ_PUBLISH_DB the database password for PostgreSQL's POSTGRES_PASSWORD_FILE.
#    A file is copied only when missing or different: a re-run after `sealmq pki revoke` or
#    `sealmq pki crl` republishes the CRL (the backend and the embedded broker re-read it; Mosquitto
#    needs a restart) and touches nothing else.
set -eu
umask 077

deploy="${SEALMQ_DEPLOY_DIR:?set SEALMQ_DEPLOY_DIR}"
to_backend="${SEALMQ_PUBLISH_BACKEND:?set SEALMQ_PUBLISH_BACKEND}"
to_devices="${SEALMQ_PUBLISH_DEVICES:?set SEALMQ_PUBLISH_DEVICES}"
broker="${SEALMQ_BROKER_DIR:?set SEALMQ_BROKER_DIR}"
devices="${SEALMQ_DEVICES:-3}"
backend_name="${SEALMQ_BACKEND_NAME:-backend}"
workers="${SEALMQ_WORKERS:-0}"

# the broker's TLS certificate names the compose service (clients reach it as "broker")
sealmq bootstrap --dir "$deploy" --devices "$devices" --broker-host "${SEALMQ_BROKER_HOST_NAME:-broker}" \
  --workers "$workers"
pki="$deploy/pki"

changed=0
# publish SRC DST: atomic copy (0600) when DST is missing or differs from SRC.
publish() {
  if [ -f "$2" ] && cmp -s "$1" "$2"; then
    return 0
  fi
  mkdir -p "$(dirname "$2")"
  cp "$1" "$2.tmp"
  chmod 600 "$2.tmp"
  mv -f "$2.tmp" "$2"
  echo "published $2"
  changed=1
}

# publish_identity DIR DST: the files an endpoint loads (never csr.pem, never a CA key).
publish_identity() {
  for f in key.pem cert.pem chain.pem mqtt.password; do
    publish "$1/$f" "$2/$f"
  done
}

for dst in "$to_backend" "$to_devices"; do
  for f in ca.crt crl.pem issuing.crt; do
    if [ -f "$pki/ca/$f" ]; then
      publish "$pki/ca/$f" "$dst/ca/$f"
    fi
  done
done
publish_identity "$pki/backend/$backend_name" "$to_backend/backend/$backend_name"
publish "$deploy/backend/console.auth" "$to_backend/console.auth"
publish "$deploy/broker/console-monitor.password" "$to_backend/console-monitor.password"
if [ "$workers" -gt 0 ]; then
  identity="$pki/backend/$backend_name"
  publish "$identity/share-group" "$to_backend/backend/$backend_name/share-group"
  for f in "$identity"/workers/*.password; do
    publish "$f" "$to_backend/backend/$backend_name/workers/$(basename "$f")"
  done
  # one state key for every worker (sealed session snapshots), made once, never replaced
  python3 -c 'import sys; from pathlib import Path; from backend.state_seal import load_or_create_key; load_or_create_key(Path(sys.argv[1]))' "$deploy/backend/state.key"
  publish "$deploy/backend/state.key" "$to_backend/state.key"
  if [ ! -f "$deploy/db.password" ]; then
    python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > "$deploy/db.password"
  fi
  printf 'db:5432:sealmq:sealmq:%s\n' "$(cat "$deploy/db.password")" > "$deploy/pgpass"
  publish "$deploy/pgpass" "$to_backend/pgpass"
  if [ -n "${SEALMQ_PUBLISH_DB:-}" ]; then
    publish "$deploy/db.password" "$SEALMQ_PUBLISH_DB/password"
  fi
fi
for dir in "$pki"/devices/*/; do
  [ -f "$dir/cert.pem" ] || continue
  id="$(basename "$dir")"
  publish_identity "$pki/devices/$id" "$to_devices/devices/$id"
done

users_changed=$changed
changed=0
publish "$deploy/broker/users" "$broker/users"
for f in ca/ca.crt ca/crl.pem broker/broker/key.pem broker/broker/chain.pem; do
  publish "$pki/$f" "$broker/pki/$f"
done
if [ "$changed" = 1 ] || [ ! -f "$broker/mosquitto/mosquitto.conf" ]; then
  if [ -f "$broker/mosquitto/mosquitto.conf" ]; then first=0; else first=1; fi
  # Inside the container the broker listens on every interface of the compose network; the host
  # publishes the port on 127.0.0.1 only (docker-compose.yml).
  # mqtts only: client certificates on $SEALMQ_BROKER_TLS_PORT, passwords (the monitor) on
  # $SEALMQ_BROKER_MONITOR_PORT; no plain-TCP listener.
  sealmq broker mosquitto-config --out "$broker/mosquitto" --passwd "$broker/users" \
    --host "${SEALMQ_BROKER_BIND:-0.0.0.0}" --no-plain --tls-pki "$broker/pki" \
    --tls-port "${SEALMQ_BROKER_TLS_PORT:-8883}" --tls-password-port "${SEALMQ_BROKER_MONITOR_PORT:-8884}"
  [ "$first" = 1 ] || echo "new broker users or certificates: restart the broker to load them (docker compose restart broker)"
fi
[ "$users_changed" = 1 ] || [ "$changed" = 1 ] || echo "nothing to publish: everything was already in place"
echo "bootstrap done"
