#!/bin/sh
# Emulates the official redis image's entrypoint essentials:
#  * `docker run IMAGE --appendonly yes` runs redis-server with those flags;
#  * protected mode is OFF by default (the official image patches redis'
#    default), so a compose `command: redis-server --appendonly yes ...`
#    (which replaces CMD and so drops its `--protected-mode no`) still accepts
#    connections from other containers. An explicit --protected-mode on the
#    command line, or in a config file given as first argument, is respected;
#  * redis-server runs as the unprivileged `redis` user, owning the workdir.
set -e

case "$1" in
    -*) set -- redis-server "$@" ;;
esac

if [ "$1" = "redis-server" ] && [ "$(id -u)" = "0" ]; then
    find . ! -user redis -exec chown redis '{}' + 2>/dev/null || true
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

if [ "$1" = "redis-server" ] || [ "$1" = "redis-sentinel" ]; then
    explicit=no
    for a in "$@"; do
        [ "$a" = "--protected-mode" ] && explicit=yes
    done
    if [ "$explicit" = no ]; then
        prog=$1
        shift
        if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
            # first argument is a config file; it may set protected-mode itself
            conf=$1
            shift
            if grep -Eiq '^[[:space:]]*protected-mode[[:space:]]' "$conf" 2>/dev/null; then
                set -- "$prog" "$conf" "$@"
            else
                set -- "$prog" "$conf" --protected-mode no "$@"
            fi
        else
            set -- "$prog" --protected-mode no "$@"
        fi
    fi
fi

exec "$@"
