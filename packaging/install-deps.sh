#!/usr/bin/env bash
# Install the Debian packages drekifs needs, only those missing (run as root).
#   packaging/install-deps.sh          what the daemon needs to build and run
#   packaging/install-deps.sh --test   plus the tools the test suite drives
set -euo pipefail

packages=(fuse3 libfuse3-dev pkg-config gcc)
if [ "${1:-}" = "--test" ]; then
    packages+=(nsd rsync attr psmisc iproute2 nftables restic tar)
fi

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
    packages+=(python3 python3-venv python3-dev)
else
    # Debian's python3 splits venv/ensurepip and the C headers (pyfuse3 compiles) out.
    "$python" -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
    "$python" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
        2>/dev/null || packages+=(python3-dev)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "drekifs needs these Debian packages: ${missing[*]} (run as root)" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# fuse3 ships no /dev/fuse in a container that lacks it; say so clearly.
[ -e /dev/fuse ] || { echo "warning: /dev/fuse is missing: mounting will fail" >&2; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "drekifs needs Python >= 3.11 ($python is $("$python" --version 2>&1))" >&2; exit 1; }
