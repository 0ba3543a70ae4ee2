#!/usr/bin/env bash
# Make sure the test suite's PostgreSQL is reachable: 127.0.0.1:5432, user postgres,
# passwordless (trust) over TCP from localhost. tests/dbsupport.py uses it by default
# (override with EDGEOTA_TEST_PG_URL); with CI=true the database tests fail without it.
#
# Steps, stopping at the first that suffices:
#   1. a server already answers on 127.0.0.1:5432  -> check the login, done;
#   2. a local cluster exists (pg_lsclusters)        -> start it;
#   3. nothing installed                             -> apt-get install postgresql,
#      create/start the cluster.
# In cases 2 and 3 the cluster is ours to configure: if user postgres cannot log in
# over TCP without a password, a trust line for it (127.0.0.1/32 only) is put first
# in pg_hba.conf and the cluster reloaded. A running server found in case 1 is never
# reconfigured. Runs as root (apt-get, pg_ctlcluster). Exit status 0 means ready.
set -euo pipefail

HOST=127.0.0.1
PORT=5432
WAIT_SECONDS=30
HBA_LINE="host all postgres ${HOST}/32 trust"
PG_ETC=/etc/postgresql  # Debian layout: $PG_ETC/<version>/<cluster>/pg_hba.conf

say() { echo "ensure-postgres: $*"; }
die() { echo "ensure-postgres: error: $*" >&2; exit 1; }

is_ready() {
    command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$HOST" -p "$PORT"
}

can_login() {
    # -w: never prompt; a password-protected login fails instead of hanging.
    psql -w -h "$HOST" -p "$PORT" -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1
}

wait_ready() {
    local waited=0
    until is_ready; do
        if (( waited >= WAIT_SECONDS )); then
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

# Prints "<version> <cluster> <status>" of the cluster on $PORT, else of the first one.
find_cluster() {
    command -v pg_lsclusters >/dev/null 2>&1 || return 0
    pg_lsclusters --no-header 2>/dev/null | awk -v port="$PORT" '
        $3 == port { print $1, $2, $4; found = 1; exit }
        NR == 1    { first = $1 " " $2 " " $4 }
        END        { if (!found && first != "") print first }'
}

server_versions() {  # installed server versions, oldest first, one per line
    find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V || true
}

cluster_port() {  # <version> <cluster>
    pg_lsclusters --no-header "$1" "$2" 2>/dev/null | awk '{ print $3 }'
}

start_cluster() {  # <version> <cluster>
    say "starting cluster $1/$2"
    pg_ctlcluster --skip-systemctl-redirect "$1" "$2" start \
        || die "pg_ctlcluster could not start cluster $1/$2 (see /var/log/postgresql/)"
}

trust_local_postgres() {  # <version> <cluster>
    local hba="$PG_ETC/$1/$2/pg_hba.conf"
    [[ -f "$hba" ]] || die "no $hba; cannot allow passwordless login for postgres"
    if grep -qxF "$HBA_LINE" "$hba"; then
        say "$hba already trusts postgres from ${HOST}"
    else
        # pg_hba.conf is first-match: the line must come before any password rule.
        cp -p "$hba" "$hba.edgeota-backup"
        { echo "# added by edgeota scripts/ensure-postgres.sh (test suite)"; echo "$HBA_LINE"; \
          cat "$hba.edgeota-backup"; } > "$hba"
        say "added '$HBA_LINE' at the top of $hba (backup: $hba.edgeota-backup)"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$1" "$2" reload || die "could not reload $1/$2"
    say "reloaded cluster $1/$2"
}

# Bring a local cluster up and make its login work: cases 2 and 3.
ensure_local_cluster() {  # <version> <cluster> <status>
    local version=$1 cluster=$2 status=$3 port
    port=$(cluster_port "$version" "$cluster")
    [[ "$port" == "$PORT" ]] || die "cluster $version/$cluster listens on port $port, not $PORT"
    if [[ "$status" != online* ]]; then
        start_cluster "$version" "$cluster"
    fi
    wait_ready || die "cluster $version/$cluster is not accepting connections after ${WAIT_SECONDS}s"
    if ! can_login; then
        trust_local_postgres "$version" "$cluster"
        # A reload takes effect for new connections at once; allow a moment anyway.
        local tries=0
        until can_login; do
            (( tries++ < 10 )) || die "user postgres still cannot log in on ${HOST}:${PORT}"
            sleep 0.5
        done
    fi
    say "PostgreSQL $version ready on ${HOST}:${PORT} (user postgres, trust)"
}

# 1. Already running.
if is_ready; then
    if ! command -v psql >/dev/null 2>&1 || can_login; then
        say "PostgreSQL already accepting connections on ${HOST}:${PORT}; nothing to do"
        exit 0
    fi
    die "a server answers on ${HOST}:${PORT} but refuses passwordless login as postgres;" \
        "add '$HBA_LINE' to its pg_hba.conf, or point EDGEOTA_TEST_PG_URL at a usable server"
fi

[[ $(id -u) -eq 0 ]] || die "not root: cannot start or install PostgreSQL (run as root, or start it yourself)"

# 2. Installed but not running.
read -r version cluster status <<< "$(find_cluster)" || true
if [[ -n "${version:-}" ]]; then
    say "found cluster $version/$cluster ($status)"
    ensure_local_cluster "$version" "$cluster" "$status"
    exit 0
fi

# 3. Not installed: the Debian package creates and starts cluster "main" where it can.
say "no PostgreSQL cluster found; installing the Debian package 'postgresql'"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || die "apt-get update failed"
apt-get install -y -qq postgresql >/dev/null || die "apt-get install postgresql failed"
say "installed server version(s): $(server_versions | tr '\n' ' ')"

read -r version cluster status <<< "$(find_cluster)" || true
if [[ -z "${version:-}" ]]; then
    version=$(server_versions | tail -n 1)
    [[ -n "$version" ]] || die "postgresql installed but no server version under /usr/lib/postgresql"
    say "creating cluster $version/main on port $PORT"
    pg_createcluster --port "$PORT" "$version" main >/dev/null \
        || die "pg_createcluster $version main failed"
    cluster=main
    status=down
fi
ensure_local_cluster "$version" "$cluster" "$status"
