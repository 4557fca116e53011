#!/usr/bin/env bash
# Installs graft and everything it needs on a fresh Debian machine (run as root, or with sudo).
#   scripts/setup.sh         graft + the demo's data (Fashion-MNIST from Debian)
#   scripts/setup.sh --dev   also the test tools, every extra, Chromium for the browser tests, and g++
#                            (torch.compile's CPU backend compiles C++; the --compile test needs it)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

packages=(dataset-fashion-mnist)
[ "$dev" = 1 ] && packages+=(chromium g++)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: no apt-get here; install ${missing[*]} yourself (graft falls back to MNIST-5k for the demo)" >&2
  fi
fi

python=${PYTHON:-python3}
if [ "$dev" = 1 ]; then
  "$python" -m pip install -q -e ".[dev]"
else
  "$python" -m pip install -q -e ".[data]"
fi
