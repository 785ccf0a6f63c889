#!/usr/bin/env bash
# Bring up a local Docker engine for development and CI.
#
# Idempotent: safe to run any number of times.
#   * installs docker.io, docker-compose and debootstrap with apt if missing
#   * starts dockerd in the background (log: /tmp/dockerd.log) unless
#     `docker info` already works; storage driver overlay2 (the default) when
#     the kernel can mount overlayfs here, else vfs
#   * waits up to 60 s for the daemon
#   * reports which compose flavour is available (v2 plugin or v1 binary)
#
# Environment:
#   DOCKER_STORAGE_DRIVER  force a storage driver (e.g. vfs) for a new daemon
#   DOCKERD_LOG            daemon log file (default /tmp/dockerd.log)
#   DOCKER_UP_TIMEOUT      seconds to wait for the daemon (default 60)
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
DOCKER_UP_TIMEOUT=${DOCKER_UP_TIMEOUT:-60}

log() { printf '[docker-up] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

have() { command -v "$1" >/dev/null 2>&1; }

compose_flavour() {
    # Prints "v2 <version>" / "v1 <version>" / nothing.
    if docker compose version >/dev/null 2>&1; then
        echo "v2 $(docker compose version --short 2>/dev/null || docker compose version | head -1)"
    elif have docker-compose; then
        echo "v1 $(docker-compose version --short 2>/dev/null || docker-compose --version)"
    fi
}

# --------------------------------------------------------------------------
# 1. packages
# --------------------------------------------------------------------------
need_pkgs=()
have dockerd || need_pkgs+=(docker.io)
have docker || need_pkgs+=(docker.io)
have debootstrap || need_pkgs+=(debootstrap)
if ! docker compose version >/dev/null 2>&1 && ! have docker-compose; then
    need_pkgs+=(docker-compose)
fi

if [ "${#need_pkgs[@]}" -gt 0 ]; then
    # Another process may be running apt right now: wait for the locks.
    for _ in $(seq 1 300); do
        if ! have fuser || ! fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock >/dev/null 2>&1; then
            break
        fi
        log "waiting for another apt/dpkg process to finish..."
        sleep 2
    done
    # Re-check: whoever held the lock may have installed them already.
    need_pkgs=()
    have dockerd || need_pkgs+=(docker.io)
    have debootstrap || need_pkgs+=(debootstrap)
    if ! docker compose version >/dev/null 2>&1 && ! have docker-compose; then
        need_pkgs+=(docker-compose)
    fi
    if [ "${#need_pkgs[@]}" -gt 0 ]; then
        mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
        log "installing: ${need_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -q
        $SUDO -E apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" iptables
    fi
fi

# --------------------------------------------------------------------------
# 2. daemon
# --------------------------------------------------------------------------
overlay_works() {
    # Can this kernel/filesystem mount overlayfs on /var/lib/docker's fs?
    local base
    $SUDO mkdir -p /var/lib/docker
    base=$($SUDO mktemp -d /var/lib/docker/.overlay-probe.XXXXXX)
    $SUDO mkdir -p "$base/lower" "$base/upper" "$base/work" "$base/merged"
    local ok=1
    if $SUDO mount -t overlay overlay \
        -o "lowerdir=$base/lower,upperdir=$base/upper,workdir=$base/work" \
        "$base/merged" >/dev/null 2>&1; then
        ok=0
        $SUDO umount "$base/merged" || true
    fi
    $SUDO rm -rf "$base"
    return $ok
}

wait_for_daemon() {
    local deadline=$((SECONDS + DOCKER_UP_TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if docker info >/dev/null 2>&1; then
            return 0
        fi
        # Give up early if the daemon we started has died.
        if [ -n "${1:-}" ] && ! kill -0 "$1" 2>/dev/null; then
            return 1
        fi
        sleep 1
    done
    return 1
}

start_dockerd() {
    local driver=$1 args=()
    if [ -n "$driver" ]; then
        args+=(--storage-driver="$driver")
    fi
    log "starting dockerd ${args[*]:-(default storage driver)} (log: $DOCKERD_LOG)"
    # setsid + nohup: the daemon must outlive this script and its caller.
    $SUDO setsid nohup dockerd "${args[@]}" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    DOCKERD_PID=$!
}

if docker info >/dev/null 2>&1; then
    log "docker daemon already running"
else
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "dockerd process exists but is not answering yet; waiting"
        if wait_for_daemon; then
            :
        else
            log "ERROR: existing dockerd did not answer within ${DOCKER_UP_TIMEOUT}s; see $DOCKERD_LOG"
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
    else
        driver=${DOCKER_STORAGE_DRIVER:-}
        if [ -z "$driver" ]; then
            if overlay_works; then
                driver=""   # daemon default: overlay2
            else
                log "overlayfs cannot be mounted here; falling back to vfs"
                driver="vfs"
            fi
        fi
        start_dockerd "$driver"
        if ! wait_for_daemon "$DOCKERD_PID"; then
            if [ -z "$driver" ]; then
                log "dockerd failed with the default storage driver; retrying with vfs"
                tail -n 20 "$DOCKERD_LOG" >&2 || true
                kill "$DOCKERD_PID" 2>/dev/null || true
                sleep 2
                start_dockerd vfs
                wait_for_daemon "$DOCKERD_PID" || {
                    log "ERROR: dockerd did not come up; see $DOCKERD_LOG"
                    tail -n 30 "$DOCKERD_LOG" >&2 || true
                    exit 1
                }
            else
                log "ERROR: dockerd did not come up; see $DOCKERD_LOG"
                tail -n 30 "$DOCKERD_LOG" >&2 || true
                exit 1
            fi
        fi
    fi
fi

# --------------------------------------------------------------------------
# 3. report
# --------------------------------------------------------------------------
flavour=$(compose_flavour)
if [ -z "$flavour" ]; then
    log "ERROR: neither 'docker compose' (v2) nor 'docker-compose' (v1) is available"
    exit 1
fi

echo "docker client:   $(docker version --format '{{.Client.Version}} (API {{.Client.APIVersion}})' 2>/dev/null || true)"
echo "docker server:   $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
echo "storage driver:  $(docker info --format '{{.Driver}}')"
echo "cgroup:          $(docker info --format '{{.CgroupDriver}} v{{.CgroupVersion}}')"
case "$flavour" in
    v2*) echo "compose:         docker compose (v2 plugin) ${flavour#v2 }" ;;
    v1*) echo "compose:         docker-compose (v1) ${flavour#v1 }" ;;
esac
echo "debootstrap:     $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo missing)"
