#!/usr/bin/env bash
# Minimal emulation of the official postgres image's docker-entrypoint.sh.
#
# Environment (as in the official image):
#   POSTGRES_PASSWORD          superuser password (required unless
#                              POSTGRES_HOST_AUTH_METHOD=trust)
#   POSTGRES_USER              superuser name (default: postgres)
#   POSTGRES_DB                database created at init (default: $POSTGRES_USER)
#   PGDATA                     data directory (default: /var/lib/postgresql/data)
#   POSTGRES_INITDB_ARGS       extra initdb arguments
#   POSTGRES_HOST_AUTH_METHOD  pg_hba method for remote hosts (default: scram-sha-256)
#
# The command is `postgres [args...]` (e.g. `postgres -c max_connections=200`);
# a command starting with `-` is taken as arguments to postgres. Any other
# command is exec'd as is.
set -Eeo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

log() { echo "docker-entrypoint: $*" >&2; }

if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" != 'postgres' ]; then
    exec "$@"
fi

# As root: prepare directories, then re-exec as the postgres user.
if [ "$(id -u)" = '0' ]; then
    mkdir -p "$PGDATA"
    chmod 00700 "$PGDATA" || :
    find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' + || :
    mkdir -p /var/run/postgresql
    chown postgres:postgres /var/run/postgresql || :
    chmod 3777 /var/run/postgresql || :
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_USER:=postgres}"
    : "${POSTGRES_DB:=$POSTGRES_USER}"
    : "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
    export POSTGRES_USER POSTGRES_DB

    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != 'trust' ]; then
        cat >&2 <<'EOM'
Error: Database is uninitialized and superuser password is not specified.
       You must specify POSTGRES_PASSWORD to a non-empty value for the
       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".
       (or set POSTGRES_HOST_AUTH_METHOD=trust to allow all connections
       without a password; NOT recommended)
EOM
        exit 1
    fi

    log "initializing database in $PGDATA"
    # (the process substitution must be on the initdb command line itself:
    # its /dev/fd/N only lives as long as that one command)
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        # shellcheck disable=SC2086
        initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
            ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA" >&2
    else
        # shellcheck disable=SC2086
        initdb --username="$POSTGRES_USER" ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA" >&2
    fi

    {
        echo
        echo "# added by docker-entrypoint.sh (as in the official image)"
        echo "listen_addresses = '*'"
    } >>"$PGDATA/postgresql.conf"
    {
        echo
        echo "# added by docker-entrypoint.sh: allow password auth from any host"
        echo "host all all all $POSTGRES_HOST_AUTH_METHOD"
    } >>"$PGDATA/pg_hba.conf"

    # Temporary server on the unix socket only, for the init steps.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p ${PGPORT:-5432}" -w start >&2

    psql_init=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
    if [ "$POSTGRES_DB" != 'postgres' ]; then
        exists=$(echo "SELECT 1 FROM pg_database WHERE datname = :'db'" \
            | "${psql_init[@]}" --dbname postgres -tA --set db="$POSTGRES_DB")
        if [ -z "$exists" ]; then
            echo 'CREATE DATABASE :"db" ;' \
                | "${psql_init[@]}" --dbname postgres --set db="$POSTGRES_DB" >&2
        fi
    fi

    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        case "$f" in
            *.sh)
                # shellcheck disable=SC1090
                if [ -x "$f" ]; then log "running $f"; "$f"
                else log "sourcing $f"; . "$f"; fi ;;
            *.sql)    log "running $f"; "${psql_init[@]}" --dbname "$POSTGRES_DB" -f "$f" >&2 ;;
            *.sql.gz) log "running $f"; gunzip -c "$f" | "${psql_init[@]}" --dbname "$POSTGRES_DB" >&2 ;;
            *)        log "ignoring $f" ;;
        esac
    done

    pg_ctl -D "$PGDATA" -m fast -w stop >&2
    log "PostgreSQL init process complete; ready for start up."
else
    log "PostgreSQL database directory appears to contain a database; skipping initialization"
fi

exec "$@"
