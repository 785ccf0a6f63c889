#!/usr/bin/env bash
# Build local stand-ins for the official images that cannot be pulled here:
#
#   autoscaler-local/python:bookworm   ~ python:3.12-slim  (Debian bookworm, Python 3.11)
#   autoscaler-local/redis:7           ~ redis:7.4-alpine  (Debian's redis-server 7.0)
#   autoscaler-local/postgres:15       ~ postgres:16-alpine (Debian's PostgreSQL 15)
#
# and, for build stages only,
#
#   autoscaler-local/python:bookworm-build   the python image + this machine's
#                                            package-index configuration
#
# The python image is a debootstrap rootfs imported with `docker import`, with no
# package-index configuration at all (no apt sources, no apt auth, no pip
# index): it is what every final image is built FROM. The -build variant adds,
# in one layer of its own, the host's apt sources / Acquire settings / auth and
# pip index settings, so that `apt-get` and `pip` work inside `docker build`;
# every Dockerfile uses it only in a throwaway build stage (PYTHON_BUILD_IMAGE,
# DEBIAN_BUILD_IMAGE, BUILD_IMAGE), so none of it reaches a final image
# (tests/docker/test_image_hygiene.py checks every layer). The redis and
# postgres stand-ins are built with the Dockerfiles in scripts/images/.
#
# Idempotent and cached:
#   * an image is skipped when its tag exists and was built by this script from
#     the same inputs (stamp files in the cache dir), unless --force
#   * the debootstrap rootfs is cached as a tarball in $AUTOSCALER_IMAGE_CACHE
#     (default /var/cache/autoscaler-images), and the redis/postgres images are
#     cached there with `docker save`, so a rerun after `docker system prune -a`
#     only needs `docker import` / `docker load`.
#
# Usage: scripts/build-base-images.sh [--force] [--refresh-rootfs] [--no-verify]
#                                     [python|redis|postgres ...]
#   --force           rebuild the images even if the tags exist (reuses the
#                     cached rootfs tarball; ignores the docker-save cache)
#   --refresh-rootfs  also re-run debootstrap
#   --no-verify       skip the smoke tests run after a fresh build
#   (python builds both the clean image and its -build variant)
#
# Needs a running docker daemon (scripts/docker-up.sh) and root (debootstrap).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
. "$HERE/lib.sh"
# shellcheck source=scripts/images.env
. "$HERE/images.env"

CACHE_DIR=${AUTOSCALER_IMAGE_CACHE:-/var/cache/autoscaler-images}
SUITE=bookworm
INCLUDE=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase

FORCE=0
REFRESH_ROOTFS=0
VERIFY=1
WANT=()
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --refresh-rootfs) REFRESH_ROOTFS=1; FORCE=1 ;;
        --no-verify) VERIFY=0 ;;
        python|redis|postgres) WANT+=("$arg") ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done
[ "${#WANT[@]}" -gt 0 ] || WANT=(python redis postgres)
wanted() { local w; for w in "${WANT[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }

log() { printf '[build-base-images] %s\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
TIMINGS=()
record() { TIMINGS+=("$(printf '%-34s %7ss  %s' "$1" "$2" "$3")"); log "$1: $3 in $2 s"; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null; }
# A tag counts as up to date when it exists and was built by this script from
# the same inputs (stamp file: "<input key> <image id>"); images built some
# other way, or from older Dockerfiles, are rebuilt.
stamp_file() { echo "$CACHE_DIR/stamp-$(echo "$1" | tr '/:' '__')"; }
is_current() { # name tag key
    local id
    id=$(image_id "$2") || return 1
    [ "$(cat "$(stamp_file "$2")" 2>/dev/null)" = "$3 $id" ]
}
write_stamp() { # name tag key
    echo "$3 $(image_id "$2")" >"$(stamp_file "$2")"
}

if [ "$(id -u)" -ne 0 ]; then
    echo "build-base-images.sh must run as root (debootstrap, docker import)" >&2
    exit 1
fi
if ! docker info >/dev/null 2>&1; then
    echo "docker daemon is not reachable: run scripts/docker-up.sh first" >&2
    exit 1
fi
mkdir -p "$CACHE_DIR"
if ! have debootstrap; then
    log "installing debootstrap (apt)"
    apt_install debootstrap >/dev/null
fi

# Cache keys: change whenever the inputs change.
key_of() { sha256sum | cut -c1-12; }
ROOTFS_KEY=$(printf '%s\n' "v1" "$SUITE" "minbase" "$INCLUDE" | key_of)
ROOTFS_TAR="$CACHE_DIR/python-$SUITE-rootfs-$ROOTFS_KEY.tar"
# The clean python image depends on this script's customisation step; the -build
# variant also on the host's index configuration and CA certificates.
PYTHON_KEY=$( (echo "$ROOTFS_KEY"; sed -n '/^customise_rootfs()/,/^}/p' "$0") | key_of)
# The index configuration the -build variant carries: when it changes, the variant and the images built
# with it are rebuilt.
index_key() {
    (echo "$PYTHON_KEY"; sed -n '/^write_index_config()/,/^}/p' "$0"
     cat /etc/ssl/certs/ca-certificates.crt /etc/apt/sources.list /etc/apt/sources.list.d/* \
         /etc/apt/apt.conf.d/* /etc/apt/auth.conf.d/* 2>/dev/null
     local key
     for key in index-url extra-index-url trusted-host; do host_pip_value "$key"; echo; done) | key_of
}
# The variant is also rebuilt when the clean image under it is (a re-import after a prune). The redis and
# postgres stand-ins are keyed on index_key alone: their docker-save cache holds their own base layers.
build_key() { (index_key; image_id "$PYTHON_IMAGE") | key_of; }

TMP_DIRS=()
cleanup() { local d; for d in "${TMP_DIRS[@]}"; do rm -rf --one-file-system "$d"; done; }
trap cleanup EXIT

# --------------------------------------------------------------------------
# python: debootstrap rootfs (cached tarball) + host CA/apt/pip config
# --------------------------------------------------------------------------
make_rootfs_tarball() {
    local t0 dir
    t0=$(now)
    dir=$(mktemp -d /var/tmp/autoscaler-rootfs.XXXXXX)
    TMP_DIRS+=("$dir")
    log "debootstrap --variant=minbase --include=$INCLUDE $SUITE (takes a few minutes)"
    if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$dir" \
            >"$CACHE_DIR/debootstrap.log" 2>&1; then
        # The default mirror may not be reachable on every machine: retry with
        # the first Debian mirror this host's own apt configuration uses.
        local mirror
        # `|| true`: no mirror found is an answer, not an error (under pipefail it would end the script here,
        # silently, before the log below is shown).
        mirror=$(host_debian_mirror || true)
        if [ -z "$mirror" ]; then
            tail -n 30 "$CACHE_DIR/debootstrap.log" >&2
            return 1
        fi
        log "debootstrap with the default mirror failed; retrying with the host's apt mirror"
        rm -rf --one-file-system "$dir"; mkdir -p "$dir"
        debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$dir" "$mirror" \
            >>"$CACHE_DIR/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE_DIR/debootstrap.log" >&2; return 1; }
    fi
    record "debootstrap" "$(elapsed "$t0")" "rootfs $(du -sh --one-file-system "$dir" | cut -f1)"

    t0=$(now)
    chroot "$dir" apt-get clean
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/log/*.log \
           "$dir"/var/cache/debconf/*-old "$dir"/var/lib/dpkg/*-old
    tar --numeric-owner --xattrs -C "$dir" --exclude='./dev/*' --exclude='./proc/*' \
        --exclude='./sys/*' -cf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf --one-file-system "$dir"
    record "rootfs tarball" "$(elapsed "$t0")" "$(du -h "$ROOTFS_TAR" | cut -f1) -> $ROOTFS_TAR"
}

host_debian_mirror() {
    # First http(s) URI of a Debian (non-security) repository in the host's apt config
    # (AUTOSCALER_HOST_APT_DIR: another apt directory to read it from).
    local apt=${AUTOSCALER_HOST_APT_DIR:-/etc/apt}
    {
        cat "$apt"/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }'
        cat "$apt"/sources.list "$apt"/sources.list.d/*.list 2>/dev/null | awk '/^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }'
    } | grep -v -- '-security' | grep -E '^https?://' | head -n 1
}

# The clean image: what debootstrap made, with no package-index configuration
# (debootstrap's sources.list names whichever mirror it used), and like
# python:*-slim, `pip install` outside a venv allowed.
customise_rootfs() {
    local dir=$1
    rm -f "$dir/etc/apt/sources.list" "$dir"/etc/apt/sources.list.d/* "$dir/etc/pip.conf"
    rm -rf "$dir/etc/apt/auth.conf.d"
    rm -f "$dir"/usr/lib/python3*/EXTERNALLY-MANAGED
}

# The -build variant's one extra layer, written under $1 (a build context's
# rootfs/): the host's apt/pip/CA configuration, so that apt-get and pip work
# inside `docker build` exactly as they do on the host. Nothing about the
# host's network is written into the repository, and nothing of this reaches
# a final image: Dockerfiles use the variant only in their build stages.
# $2: debootstrap's own sources.list, used when the host has no bookworm source.
write_index_config() {
    local dir=$1 debootstrap_sources=$2 f

    # --- CA certificates: the host's bundle, plus the host's local CAs so that
    #     update-ca-certificates (triggered by later apt installs) keeps them.
    if [ -d /usr/local/share/ca-certificates ]; then
        mkdir -p "$dir/usr/local/share/ca-certificates"
        cp -a /usr/local/share/ca-certificates/. "$dir/usr/local/share/ca-certificates/"
    fi
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "$dir/etc/ssl/certs"
        cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
    fi

    # --- apt sources: the host's Debian sources (those whose keyring exists
    #     in the image), else debootstrap's own.
    local copied=0 keyring
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
        [ -s "$f" ] || continue
        grep -q "$SUITE" "$f" || continue
        keyring=$(sed -n -E 's/^Signed-By:[[:space:]]*(\/[^[:space:]]+).*/\1/p; s/.*signed-by=(\/[^] ]+).*/\1/p' "$f" | head -n 1)
        if [ -n "$keyring" ] && ! docker run --rm --entrypoint test "$PYTHON_IMAGE" -e "$keyring"; then
            log "not copying apt source $f (keyring $keyring is not in the image)"
            continue
        fi
        mkdir -p "$dir$(dirname "$f")"
        cp "$f" "$dir$f"
        copied=1
    done
    if [ "$copied" = 0 ]; then
        if [ ! -s "$debootstrap_sources" ]; then
            echo "no apt source for $SUITE: neither this host's (/etc/apt) nor debootstrap's (rootfs" \
                 "tarball $ROOTFS_TAR missing?); run with --refresh-rootfs" >&2
            return 1
        fi
        mkdir -p "$dir/etc/apt"
        cp "$debootstrap_sources" "$dir/etc/apt/sources.list"
    fi
    # apt.conf.d snippets that tune fetching (e.g. Check-Valid-Until for a
    # snapshot mirror, proxies): copy those that set Acquire:: options.
    mkdir -p "$dir/etc/apt/apt.conf.d"
    for f in /etc/apt/apt.conf.d/*; do
        [ -f "$f" ] || continue
        if grep -q '^[[:space:]]*Acquire' "$f"; then
            cp "$f" "$dir/etc/apt/apt.conf.d/"
        fi
    done
    if [ -d /etc/apt/auth.conf.d ]; then
        mkdir -p "$dir/etc/apt/auth.conf.d"
        cp -a /etc/apt/auth.conf.d/. "$dir/etc/apt/auth.conf.d/"
    fi

    # --- pip: trust the CA bundle (Debian's pip already does, but pip
    #     installed *inside* a venv uses certifi's bundle otherwise), and carry
    #     over a network index the host is configured with, if any (file://
    #     indexes and local find-links are host-only and are not copied).
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        echo "disable-pip-version-check = true"
        echo "timeout = ${PIP_DEFAULT_TIMEOUT:-180}"
        local key val
        for key in index-url extra-index-url trusted-host; do
            val=$(host_pip_value "$key")
            if [ -n "$val" ]; then
                if [ "$key" != trusted-host ]; then
                    # shellcheck disable=SC2086
                    val=$(printf '%s\n' $val | { grep -E '^https?://' || true; } | tr '\n' ' ' | sed 's/ $//')
                fi
                if [ -n "$val" ]; then echo "$key = $val"; fi
            fi
        done
    } >"$dir/etc/pip.conf"
}

host_pip_value() {
    # $1: pip option name; env var wins over config files, as in pip itself.
    local env_name val
    env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    val=${!env_name:-}
    if [ -z "$val" ] && command -v pip3 >/dev/null 2>&1; then
        val=$(pip3 config get "global.$1" 2>/dev/null || true)
    fi
    printf '%s' "$val"
}

build_python() {
    local tag=$PYTHON_IMAGE t0 dir
    if [ "$FORCE" = 0 ] && is_current python "$tag" "$PYTHON_KEY"; then
        record "$tag" "0.0" "cached (image exists)"
        return 0
    fi
    if [ "$REFRESH_ROOTFS" = 1 ] || [ ! -s "$ROOTFS_TAR" ]; then
        make_rootfs_tarball
    else
        log "using cached rootfs $ROOTFS_TAR"
    fi

    t0=$(now)
    dir=$(mktemp -d /var/tmp/autoscaler-rootfs.XXXXXX)
    TMP_DIRS+=("$dir")
    tar --numeric-owner --xattrs -C "$dir" -xpf "$ROOTFS_TAR"
    customise_rootfs "$dir"
    tar --numeric-owner --xattrs -C "$dir" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["python3"]' \
        - "$tag" >/dev/null
    rm -rf --one-file-system "$dir"
    write_stamp python "$tag" "$PYTHON_KEY"
    record "$tag" "$(elapsed "$t0")" "imported"

}

# The -build variant: the clean image plus one layer of index configuration.
build_python_build() {
    local tag=$PYTHON_BUILD_IMAGE key t0 ctx
    key=$(build_key)
    if [ "$FORCE" = 0 ] && is_current python-build "$tag" "$key"; then
        record "$tag" "0.0" "cached (image exists)"
        return 0
    fi
    t0=$(now)
    ctx=$(mktemp -d /var/tmp/autoscaler-build-ctx.XXXXXX)
    TMP_DIRS+=("$ctx")
    mkdir -p "$ctx/rootfs"
    # debootstrap's own sources.list (the clean image has none), for a host without a bookworm source.
    tar -xOf "$ROOTFS_TAR" ./etc/apt/sources.list >"$ctx/debootstrap-sources.list" 2>/dev/null || true
    write_index_config "$ctx/rootfs" "$ctx/debootstrap-sources.list"
    printf '%s\n' 'ARG BASE_IMAGE' 'FROM ${BASE_IMAGE}' 'COPY rootfs/ /' \
        'LABEL org.autoscaler.role="build stages only: carries the build machine'"'"'s package-index configuration"' \
        >"$ctx/Dockerfile"
    if ! docker build --rm --force-rm --build-arg BASE_IMAGE="$PYTHON_IMAGE" -t "$tag" "$ctx" \
            >"$CACHE_DIR/build-python-build.log" 2>&1; then
        tail -n 40 "$CACHE_DIR/build-python-build.log" >&2
        echo "building $tag FAILED" >&2
        return 1
    fi
    record "$tag" "$(elapsed "$t0")" "docker build (index configuration layer)"

    if [ "$VERIFY" = 1 ]; then
        t0=$(now)
        verify_python
        record "verify $tag" "$(elapsed "$t0")" "venv + pip install from the index OK; $PYTHON_IMAGE has no index configuration"
    fi
    # Only now: a variant that failed its check is built again next time, not taken as current.
    write_stamp python-build "$tag" "$key"
}

verify_python() {
    # A throw-away build that does what the project's Dockerfiles do.
    local ctx
    ctx=$(mktemp -d /var/tmp/autoscaler-verify.XXXXXX)
    TMP_DIRS+=("$ctx")
    cat >"$ctx/Dockerfile" <<'EOF'
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir six \
 && /opt/venv/bin/python -c 'import six, ssl; print("six", six.__version__, ssl.OPENSSL_VERSION)' \
 && python --version && pip --version
EOF
    if ! docker build --rm --force-rm --no-cache --build-arg PYTHON_IMAGE="$PYTHON_BUILD_IMAGE" \
            -t autoscaler-local/verify:python "$ctx" >"$CACHE_DIR/verify-python.log" 2>&1; then
        cat "$CACHE_DIR/verify-python.log" >&2
        echo "verification build FAILED" >&2
        return 1
    fi
    grep -E '^(six |Python |pip )' "$CACHE_DIR/verify-python.log" >&2 || true
    docker image rm -f autoscaler-local/verify:python >/dev/null 2>&1 || true
    local leftover
    leftover=$(docker run --rm --entrypoint sh "$PYTHON_IMAGE" -c \
        'ls -d /etc/pip.conf /etc/apt/sources.list /etc/apt/sources.list.d/* /etc/apt/auth.conf.d 2>/dev/null' || true)
    if [ -n "$leftover" ]; then
        echo "$PYTHON_IMAGE still has package-index configuration: $leftover" >&2
        return 1
    fi
}

# --------------------------------------------------------------------------
# redis / postgres: Dockerfiles FROM the python image (cached via docker save)
# --------------------------------------------------------------------------
build_from_dockerfile() {
    local name=$1 tag=$2 ctx="$HERE/images/$1" t0 key saved
    key=$( (echo "$PYTHON_KEY"; index_key; cd "$ctx" && find . -type f | LC_ALL=C sort | xargs sha256sum) | key_of)
    if [ "$FORCE" = 0 ] && is_current "$name" "$tag" "$key"; then
        record "$tag" "0.0" "cached (image exists)"
        return 0
    fi
    saved="$CACHE_DIR/$name-$key.docker.tar"
    if [ "$FORCE" = 0 ] && [ -s "$saved" ]; then
        t0=$(now)
        docker load -i "$saved" >/dev/null
        write_stamp "$name" "$tag" "$key"
        record "$tag" "$(elapsed "$t0")" "docker load from $saved"
        return 0
    fi
    if ! is_current python "$PYTHON_IMAGE" "$PYTHON_KEY"; then
        build_python
    fi
    if ! is_current python-build "$PYTHON_BUILD_IMAGE" "$(build_key)"; then
        build_python_build
    fi
    t0=$(now)
    local extra=()
    [ "$FORCE" = 1 ] && extra+=(--no-cache)
    if ! docker build --rm --force-rm "${extra[@]}" --build-arg BASE_IMAGE="$PYTHON_IMAGE" \
            --build-arg BUILD_IMAGE="$PYTHON_BUILD_IMAGE" \
            -t "$tag" "$ctx" >"$CACHE_DIR/build-$name.log" 2>&1; then
        tail -n 40 "$CACHE_DIR/build-$name.log" >&2
        echo "building $tag FAILED (log: $CACHE_DIR/build-$name.log)" >&2
        return 1
    fi
    write_stamp "$name" "$tag" "$key"
    record "$tag" "$(elapsed "$t0")" "docker build"
    t0=$(now)
    rm -f "$CACHE_DIR/$name-"*.docker.tar
    docker save -o "$saved.tmp" "$tag" && mv "$saved.tmp" "$saved"
    record "save $tag" "$(elapsed "$t0")" "$(du -h "$saved" | cut -f1) -> $saved"
}

T_ALL=$(now)
# `if`, not `wanted x && build_x`: bash ignores errexit inside a function called on the left of `&&`, so a
# failed debootstrap, import or build would go on and stamp a broken image as current.
if wanted python; then
    build_python
    build_python_build
fi
if wanted redis; then build_from_dockerfile redis "$REDIS_IMAGE"; fi
if wanted postgres; then build_from_dockerfile postgres "$POSTGRES_IMAGE"; fi

echo "---- build-base-images timings ----"
printf '%s\n' "${TIMINGS[@]}"
echo "total: $(elapsed "$T_ALL") s"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.ID}}\t{{.Size}}' | grep '^autoscaler-local/' || true
