#!/usr/bin/env bash
# Set up a fresh machine for memslots: a virtual environment in .venv with the package.
#   bash scripts/setup.sh          the package and its CLI: every command but simulate --plots
#   bash scripts/setup.sh --plots  plus matplotlib, for simulate --plots
#   bash scripts/setup.sh --tests  plus matplotlib and the test tools and, as root on Debian,
#                                  the real vhost-user back-ends (qemu-storage-daemon,
#                                  virtiofsd) and QEMU (to compare memory layouts with)
set -euo pipefail
cd "$(dirname "$0")/.."

tests=0
extra=""
case "${1:-}" in
    --tests) tests=1; extra="[dev]" ;;
    --plots) extra="[plot]" ;;
    "") ;;
    *) echo "usage: bash scripts/setup.sh [--tests|--plots]" >&2; exit 1 ;;
esac

if [ "$tests" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # The real vhost-user back-ends, and QEMU itself to compare memory layouts with.
    if [ ! -x /usr/bin/qemu-storage-daemon ] || [ ! -x /usr/lib/qemu/virtiofsd ] \
        || [ ! -x /usr/bin/qemu-system-x86_64 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends qemu-system-common qemu-system-x86 \
            >/dev/null
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".$extra"
