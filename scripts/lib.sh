# shellcheck shell=bash
# Helpers shared by the set-up scripts (sourced, not run). Each script supports two kinds of user:
# root, and a user who may sudo. Nothing here assumes either: every privileged step goes through as_root.

# dockerd, debootstrap, usermod and friends live in /usr/sbin, which is not on an ordinary user's PATH:
# without it a sudoer would see them as missing and reinstall them on every run.
case ":$PATH:" in
    *:/usr/sbin:*) ;;
    *) PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;;
esac
export PATH

have() { command -v "$1" >/dev/null 2>&1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as root: directly when we are root, through sudo otherwise. Environment for the command
# goes through `env`, never `sudo -E` (which some sudoers policies refuse and which is empty as root).
as_root() {
    if is_root; then
        "$@"
    elif have sudo; then
        sudo -- "$@"
    else
        echo "this step needs root and sudo is not installed: run as root, or install sudo ($*)" >&2
        return 1
    fi
}

# Can the user run privileged steps without a password prompt hanging a CI job?
can_be_root() {
    is_root && return 0
    have sudo || return 1
    # -n: never prompt; a terminal user is asked by sudo itself later, so only fail without one.
    sudo -n true 2>/dev/null || [ -t 0 ]
}

apt_install() {
    # Install Debian packages; waits for another apt/dpkg to release its locks first.
    local _
    if ! have apt-get; then
        echo "apt-get is not available: install these yourself: $*" >&2
        return 1
    fi
    for _ in $(seq 1 150); do
        if ! have fuser || ! as_root fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock \
                /var/lib/apt/lists/lock >/dev/null 2>&1; then
            break
        fi
        echo "waiting for another apt/dpkg process to finish..." >&2
        sleep 2
    done
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Is a process alive? `kill -0` cannot tell: it fails with EPERM for a process of another user (e.g. a
# dockerd started through sudo), which would read as "dead".
pid_alive() { [ -n "${1:-}" ] && [ -d "/proc/$1" ]; }

# `docker` as this user can reach the engine.
docker_ok() { docker info >/dev/null 2>&1; }

# The engine answers, but only to root: the user is not in the socket's group.
docker_needs_root() { ! docker_ok && ! is_root && have sudo && sudo -n docker info >/dev/null 2>&1; }

# `docker compose` (v2 plugin) when it is there, else `docker-compose` (v1); prints the command or nothing.
compose_cmd() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif have docker-compose; then
        echo "docker-compose"
    fi
}

# The settings `scripts/up` chose for this checkout (images, socket group, secrets), written to
# .autoscaler/up.env so that `scripts/compose` and `scripts/demo` run the same project the same way.
# Variables already set in the environment win.
load_up_env() {
    local root=$1 file line name
    file="$root/.autoscaler/up.env"
    if [ -f "$file" ]; then
        while IFS= read -r line || [ -n "$line" ]; do
            case "$line" in ''|'#'*) continue ;; esac
            name=${line%%=*}
            [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
            [ -n "${!name+x}" ] || export "${line?}"
        done <"$file"
    fi
    export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-stack}"
}

# Make sure the engine runs and this user can reach it (scripts/docker-up.sh), then return. A user that
# docker-up.sh has just added to the socket's group does not have it in this shell yet: the calling script
# is re-run under it (`sg docker`), once. Usage: ensure_docker "$0" "$@"
ensure_docker() {
    local script=$1 rc
    shift
    set +e
    "$(dirname "${BASH_SOURCE[0]}")/docker-up.sh"
    rc=$?
    set -e
    if [ "$rc" -eq 3 ] && [ -z "${AUTOSCALER_UNDER_SG:-}" ] && have sg; then
        echo "re-running $script under the docker group (sg docker)" >&2
        export AUTOSCALER_UNDER_SG=1
        exec sg docker -c "$(printf '%q ' "$script" "$@")"
    fi
    return "$rc"
}

# The base images for the stack and the autoscaler: PYTHON_IMAGE, REDIS_IMAGE, POSTGRES_IMAGE, exported.
# Values in the environment win; else the official images when they are here or can be pulled (each pull
# bounded by AUTOSCALER_PULL_TIMEOUT, default 120 s, so that a registry that does not answer costs a
# bounded wait); else the local stand-ins, built with debootstrap by scripts/build-base-images.sh (root).
OFFICIAL_PYTHON=python:3.12-slim
OFFICIAL_REDIS=redis:7.4-alpine
OFFICIAL_POSTGRES=postgres:16-alpine
OFFICIAL_DEBIAN=debian:bookworm-slim

choose_images() {
    local here image official=1
    here=$(dirname "${BASH_SOURCE[0]}")
    if [ -n "${PYTHON_IMAGE:-}" ] && [ -n "${REDIS_IMAGE:-}" ] && [ -n "${POSTGRES_IMAGE:-}" ]; then
        # Any python:*-slim is a Debian bookworm too: the socket proxy builds on it.
        export DEBIAN_IMAGE=${DEBIAN_IMAGE:-$PYTHON_IMAGE}
        # Build stages: the image plus the machine's package-index settings, if it needs any (a stand-in's
        # is its -build variant; without one, the build stages use the image itself).
        if [ -z "${PYTHON_BUILD_IMAGE:-}" ] && docker image inspect "$PYTHON_IMAGE-build" >/dev/null 2>&1; then
            PYTHON_BUILD_IMAGE=$PYTHON_IMAGE-build
        fi
        export PYTHON_BUILD_IMAGE=${PYTHON_BUILD_IMAGE:-}
        # The proxy's package download is resolved against its build image: only the same Debian will do.
        if [ -z "${DEBIAN_BUILD_IMAGE:-}" ] && [ "$DEBIAN_IMAGE" = "$PYTHON_IMAGE" ]; then
            DEBIAN_BUILD_IMAGE=$PYTHON_BUILD_IMAGE
        fi
        export DEBIAN_BUILD_IMAGE=${DEBIAN_BUILD_IMAGE:-}
        echo "images from the environment: $PYTHON_IMAGE, $REDIS_IMAGE, $POSTGRES_IMAGE, $DEBIAN_IMAGE" >&2
        return 0
    fi
    for image in "$OFFICIAL_PYTHON" "$OFFICIAL_REDIS" "$OFFICIAL_POSTGRES" "$OFFICIAL_DEBIAN"; do
        docker image inspect "$image" >/dev/null 2>&1 && continue
        echo "pulling $image (at most ${AUTOSCALER_PULL_TIMEOUT:-120}s)" >&2
        if ! _pull_bounded "$image"; then
            echo "cannot pull $image: no registry answers here; using local stand-ins instead" >&2
            official=0
            break
        fi
    done
    if [ "$official" = 1 ]; then
        export PYTHON_IMAGE=$OFFICIAL_PYTHON REDIS_IMAGE=$OFFICIAL_REDIS POSTGRES_IMAGE=$OFFICIAL_POSTGRES \
            DEBIAN_IMAGE=$OFFICIAL_DEBIAN
        return 0
    fi
    if ! can_be_root; then
        echo "building the local stand-in images needs root (debootstrap): run as root or a sudoer" >&2
        return 1
    fi
    as_root "$here/build-base-images.sh"
    # Only the stand-ins' names: what the environment already set (e.g. one image) is kept.
    # shellcheck source=scripts/images.env
    . "$here/images.env"
}

_pull_bounded() {
    if have timeout; then
        timeout "${AUTOSCALER_PULL_TIMEOUT:-120}" docker pull -q "$1" >/dev/null 2>&1
    else
        docker pull -q "$1" >/dev/null 2>&1
    fi
}

random_secret() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

# Set NAME=VALUE in .autoscaler/up.env (mode 600), replacing an earlier value. Usage: set_up_env ROOT NAME VALUE
set_up_env() {
    local file="$1/.autoscaler/up.env"
    (umask 077; mkdir -p "$1/.autoscaler"; touch "$file"
     grep -v "^$2=" "$file" >"$file.tmp" || true
     printf '%s=%s\n' "$2" "$3" >>"$file.tmp"
     mv "$file.tmp" "$file")
}

# The stack's secrets: the environment's (load_up_env has read .autoscaler/up.env), else new random ones
# (DJANGO_SECRET_KEY, DB_PASSWORD, DB_ADMIN_PASSWORD, REDIS_PASSWORD, STATE_REDIS_PASSWORD).
# A stack from before the app had its own database role used DB_PASSWORD for the superuser too: its volume
# was created with it, so it stays the superuser's password. Usage: ensure_secrets ROOT
ensure_secrets() {
    if [ -z "${DB_ADMIN_PASSWORD:-}" ] && [ -n "${DB_PASSWORD:-}" ] && grep -qs '^DB_PASSWORD=' "$1/.autoscaler/up.env"; then
        # The superuser keeps the old password; the app's role gets a new one (db-setup sets it at every
        # start), so the superuser's password is not in every web and worker container's environment.
        export DB_ADMIN_PASSWORD=$DB_PASSWORD
        DB_PASSWORD=$(random_secret 16)
        export DB_PASSWORD
    fi
    export DJANGO_SECRET_KEY=${DJANGO_SECRET_KEY:-$(random_secret 32)}
    export DB_PASSWORD=${DB_PASSWORD:-$(random_secret 16)}
    export DB_ADMIN_PASSWORD=${DB_ADMIN_PASSWORD:-$(random_secret 16)}
    # The stack's Redis servers (broker, results) and the autoscaler's state store: added to an up.env
    # written before they had passwords. They reach redis-server as a config line: a restricted alphabet.
    export REDIS_PASSWORD=${REDIS_PASSWORD:-$(random_secret 16)}
    export STATE_REDIS_PASSWORD=${STATE_REDIS_PASSWORD:-$(random_secret 16)}
    case "$REDIS_PASSWORD$STATE_REDIS_PASSWORD" in
        *[!A-Za-z0-9._~+/=-]*)
            echo "REDIS_PASSWORD / STATE_REDIS_PASSWORD: use letters, digits and ._~+/=- only" >&2
            return 1 ;;
    esac
}
