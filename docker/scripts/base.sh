#!/usr/bin/env bash
# Build cellpipe-base:bookworm, the local stand-in for the production base images, from
# Debian packages (mmdebstrap + docker import): where no registry image can be pulled.
#
#   docker/scripts/base.sh            # skips when the image exists
#   docker/scripts/base.sh --force    # rebuild
#
# The image carries what the wheels need at run time (libgomp1 for onnxruntime,
# libpython3.11 for Triton's Python backend stub) and this host's network settings for
# installing packages in later builds, generated here and never committed:
#   - the locally trusted CA certificates (/usr/local/share/ca-certificates), installed
#     with update-ca-certificates, so pip and apt reach the registries through the
#     same TLS-inspecting proxy as the host;
#   - /etc/pip.conf with the host's http(s) index URLs and timeout (file:// indexes of the
#     host cannot be reached from a build and are left out);
#   - apt options the host's mirror needs (Check-Valid-Until false for snapshots).
set -euo pipefail

IMAGE=${CELLPIPE_BASE_IMAGE:-cellpipe-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,libgomp1,libpython3.11

if [ "${1:-}" != "--force" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base.sh: $IMAGE exists; skipping (--force rebuilds)"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "base.sh: mmdebstrap missing (docker/scripts/dockerd.sh start installs it)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/certs"

# The CA certificates update-ca-certificates installed on this host.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$work/certs/"
fi

# pip settings as pip on this host sees them (files and PIP_* variables), http(s) only.
pip_value() {  # the effective value of one pip setting, or nothing; never credentials
    # (user:password@ in an index URL would be baked into every image built on this base)
    python3 -m pip config list 2>/dev/null \
        | sed -n "s/^[^.]*\.${1}='\(.*\)'$/\1/p" | tail -n 1 \
        | sed -E 's#://[^/@ ]+@#://#g'
}
{
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    timeout=$(pip_value default-timeout); timeout=${timeout:-$(pip_value timeout)}
    [ -z "$timeout" ] || echo "timeout = $timeout"
    index=$(pip_value index-url | tr ' ' '\n' | grep -E '^https?://' | head -n 1 || true)
    [ -z "$index" ] || echo "index-url = $index"
    extra=$(pip_value extra-index-url | tr ' ' '\n' | grep -E '^https?://' | tr '\n' ' ' || true)
    [ -z "${extra// /}" ] || echo "extra-index-url = $extra"
    trusted=$(pip_value trusted-host)
    [ -z "$trusted" ] || echo "trusted-host = $trusted"
    echo "disable-pip-version-check = true"
} > "$work/pip.conf"
echo "base.sh: pip settings for builds:"; sed 's/^/    /' "$work/pip.conf"

started=$(date +%s)
mmdebstrap --variant=minbase --include="$PACKAGES" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook="copy-in $work/pip.conf /etc" \
    --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"" \
    --customize-hook="sync-in $work/certs /usr/local/share/ca-certificates" \
    --customize-hook='chroot "$1" update-ca-certificates' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" "$work/base.tar" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"

docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    "$work/base.tar" "$IMAGE"
echo "base.sh: built $IMAGE in $(( $(date +%s) - started )) s"
