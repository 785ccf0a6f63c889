#!/usr/bin/env bash
# Bring up a local Docker engine for development and CI.
#
# Idempotent: safe to run any number of times, as root or as a user who may sudo.
#   * installs docker.io and a Compose (v2 if apt has it, else docker-compose v1) with apt when they are
#     missing and the engine does not already answer (Debian/Ubuntu; elsewhere it says what to install).
#     Docker Desktop, or an engine installed some other way, is used as it is.
#   * starts dockerd in the background (log: /tmp/dockerd.log) unless the engine already answers;
#     storage driver overlay2 (the default) when the kernel can mount overlayfs here, else vfs
#   * waits up to 60 s for the daemon
#   * as a non-root user outside the socket's group: adds the user to the `docker` group and says how
#     to use it in the current shell (`sg docker -c ...`, or log in again)
#   * reports which compose flavour is available
#
# Environment:
#   DOCKER_STORAGE_DRIVER  force a storage driver (e.g. vfs) for a new daemon
#   DOCKERD_LOG            daemon log file (default /tmp/dockerd.log)
#   DOCKERD_PIDFILE        the pid file of a daemon started here (default /var/run/docker.pid, dockerd's own)
#   DOCKER_UP_TIMEOUT      seconds to wait for the daemon (default 60)
#   DOCKER_UP_NO_INSTALL   1 = never install packages, fail saying what is missing
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
. "$HERE/lib.sh"

DOCKERD_LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
DOCKERD_PIDFILE=${DOCKERD_PIDFILE:-/var/run/docker.pid}
DOCKER_UP_TIMEOUT=${DOCKER_UP_TIMEOUT:-60}

log() { printf '[docker-up] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

engine_answers() { have docker && { docker_ok || { ! is_root && have sudo && sudo -n docker info >/dev/null 2>&1; }; }; }
# By name in /proc, not pgrep: a minimal system may have no procps.
dockerd_running() { grep -qsx dockerd /proc/[0-9]*/comm; }

# --------------------------------------------------------------------------
# 1. packages
# --------------------------------------------------------------------------
missing_packages() {
    local pkgs=()
    have docker || pkgs+=(docker.io)
    # No local daemon binary is fine when an engine answers (Docker Desktop, a remote DOCKER_HOST).
    have dockerd || engine_answers || pkgs+=(docker.io)
    if [ -z "$(compose_cmd)" ]; then
        # Ubuntu ships Compose v2 as a package; Debian 12 only has v1.29.
        if apt-cache show docker-compose-v2 >/dev/null 2>&1; then
            pkgs+=(docker-compose-v2)
        else
            pkgs+=(docker-compose)
        fi
    fi
    [ "${#pkgs[@]}" -eq 0 ] || printf '%s\n' "${pkgs[@]}" | sort -u
}

# Plain words, not arrays: this part also runs on macOS's bash 3.2 (Docker Desktop), which has no mapfile.
need=$(missing_packages | tr '\n' ' ' | sed 's/ $//')
if [ -n "$need" ]; then
    if [ "${DOCKER_UP_NO_INSTALL:-0}" = 1 ]; then
        die "missing: $need (DOCKER_UP_NO_INSTALL=1, so nothing is installed)"
    fi
    if ! have apt-get; then
        die "missing: $need; this is not a Debian/Ubuntu machine: install Docker Engine and Compose yourself"
    fi
    if ! can_be_root; then
        die "missing: $need; installing them needs root: run as root, or as a user who may sudo"
    fi
    log "installing: $need (apt)"
    # shellcheck disable=SC2086  # one word per package
    apt_install $need iptables >/dev/null
    still=$(missing_packages | tr '\n' ' ')
    [ -z "$still" ] || die "apt finished but these are still missing: $still"
fi

# --------------------------------------------------------------------------
# 2. daemon
# --------------------------------------------------------------------------
overlay_works() {
    # Can this kernel/filesystem mount overlayfs on /var/lib/docker's file system?
    local base ok=1
    as_root mkdir -p /var/lib/docker
    base=$(as_root mktemp -d /var/lib/docker/.overlay-probe.XXXXXX)
    as_root mkdir -p "$base/lower" "$base/upper" "$base/work" "$base/merged"
    if as_root mount -t overlay overlay -o "lowerdir=$base/lower,upperdir=$base/upper,workdir=$base/work" \
            "$base/merged" >/dev/null 2>&1; then
        ok=0
        as_root umount "$base/merged" || true
    fi
    as_root rm -rf "$base"
    return $ok
}

wait_for_daemon() {
    # Until the engine answers, or the daemon we started is gone (checked by name: through sudo, `$!` is
    # sudo's pid, and `kill -0` on a root process fails with EPERM for a user).
    local deadline=$((SECONDS + DOCKER_UP_TIMEOUT)) started=$SECONDS
    while [ "$SECONDS" -lt "$deadline" ]; do
        engine_answers && return 0
        if [ $((SECONDS - started)) -ge 3 ] && ! dockerd_running; then
            return 1
        fi
        sleep 1
    done
    return 1
}

start_dockerd() {
    local driver=$1 args=()
    [ -n "$driver" ] && args+=(--storage-driver="$driver")
    log "starting dockerd ${args[*]:-(default storage driver)} (log: $DOCKERD_LOG)"
    # setsid + nohup: the daemon must outlive this script and its caller.
    as_root setsid nohup dockerd --pidfile "$DOCKERD_PIDFILE" ${args[@]+"${args[@]}"} >>"$DOCKERD_LOG" 2>&1 </dev/null &
}

stop_our_dockerd() {
    # Only the daemon started above, named by its pid file (dockerd writes it first thing), and only if that
    # process is a dockerd: any other one on this machine (another engine, one inside a container, whose
    # processes show in this /proc too) is not ours to stop.
    local pid _
    pid=$(as_root cat "$DOCKERD_PIDFILE" 2>/dev/null || true)
    case "$pid" in ''|*[!0-9]*) return 0 ;; esac
    grep -qsx dockerd "/proc/$pid/comm" || return 0
    as_root kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do pid_alive "$pid" || return 0; sleep 0.5; done
}

fail_daemon() {
    log "ERROR: dockerd did not come up within ${DOCKER_UP_TIMEOUT}s; its log ($DOCKERD_LOG) ends:"
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    exit 1
}

if engine_answers; then
    log "docker daemon already running"
elif dockerd_running; then
    log "dockerd process exists but is not answering yet; waiting"
    wait_for_daemon || fail_daemon
else
    can_be_root || die "the Docker engine is not running, and starting it needs root (or sudo)"
    driver=${DOCKER_STORAGE_DRIVER:-}
    if [ -z "$driver" ] && ! overlay_works; then
        log "overlayfs cannot be mounted here; falling back to vfs"
        driver=vfs
    fi
    start_dockerd "$driver"
    if ! wait_for_daemon; then
        [ -n "$driver" ] && fail_daemon
        log "dockerd failed with the default storage driver; retrying with vfs"
        tail -n 20 "$DOCKERD_LOG" >&2 || true
        stop_our_dockerd
        start_dockerd vfs
        wait_for_daemon || fail_daemon
    fi
fi

# --------------------------------------------------------------------------
# 3. access for a non-root user
# --------------------------------------------------------------------------
if ! docker_ok; then
    # The engine answers root only: the socket belongs to root:docker and this user is not in `docker`.
    socket_group=$(stat -c %G /var/run/docker.sock 2>/dev/null || echo docker)
    if ! id -nG "$(id -un)" | tr ' ' '\n' | grep -qx "$socket_group"; then
        log "adding $(id -un) to the '$socket_group' group, which may use the Docker socket"
        as_root usermod -aG "$socket_group" "$(id -un)"
    fi
    log "this shell does not have the '$socket_group' group yet. Either log in again, or run the command"
    log "under it now, e.g.:   sg $socket_group -c 'scripts/test'"
    log "(membership of '$socket_group' is equivalent to root on this host: that is what the socket grants)"
    exit 3
fi

# --------------------------------------------------------------------------
# 4. report
# --------------------------------------------------------------------------
compose=$(compose_cmd)
[ -n "$compose" ] || die "neither 'docker compose' (v2) nor 'docker-compose' (v1) is available"
echo "docker client:   $(docker version --format '{{.Client.Version}} (API {{.Client.APIVersion}})' 2>/dev/null || true)"
echo "docker server:   $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
echo "storage driver:  $(docker info --format '{{.Driver}}')"
echo "cgroup:          $(docker info --format '{{.CgroupDriver}} v{{.CgroupVersion}}')"
echo "compose:         $compose ($($compose version --short 2>/dev/null || $compose version | head -1))"
