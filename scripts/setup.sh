#!/usr/bin/env bash
# Create .venv and install the project with its pinned dev dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==25.3"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# The llama.cpp runtime the way the builder compiles it for a slot (runtime CPU dispatch, and
# llama-server beside the bindings: the serving engine), instead of PyPI's sdist compiled for
# this machine. Compiled once per machine into the builder's cache (about 12 minutes on 2
# cores), then taken from there; reinstalled only when the built wheel changes.
read -r WHEEL _ < <(.venv/bin/python tests/portable_build.py .build/portable | tail -n 1)
STAMP=".venv/.llama-runtime-$(sha256sum "$WHEEL" | cut -c1-16)"
if [ ! -e "$STAMP" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    --force-reinstall "$WHEEL"
  rm -f .venv/.llama-runtime-* && touch "$STAMP"
fi
# PyInstaller for appliance-builder freeze, exactly as its lock pins it (hashes checked).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
  -r lockfiles/requirements.appliance-freeze.txt
# debootstrap makes the Debian root without Python that tests/test_nopython_host.py runs the
# standalone appliance in; installed when missing, as root, where apt exists.
if ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap) \
      >/dev/null 2>&1 || echo "setup: could not install debootstrap; the no-Python host test will fail" >&2
  else
    echo "setup: debootstrap is not installed (needs root and apt-get); the no-Python host test will skip" >&2
  fi
fi
# qemu-user runs the portable-runtime test under an emulated CPU without AVX-512
# (tests/test_portable_runtime.py); installed when missing, as root, where apt exists.
if ! command -v qemu-x86_64 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user) \
      >/dev/null 2>&1 || echo "setup: could not install qemu-user; the emulated-CPU test will skip" >&2
  else
    echo "setup: qemu-user is not installed (needs root and apt-get); the emulated-CPU test will skip" >&2
  fi
fi
# promtool and prometheus: the monitoring tests check the shipped alert rules and scrape a real
# serve with a real Prometheus (tests/test_monitoring.py); Debian's package, installed when
# missing, as root, where apt exists.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends prometheus) \
      >/dev/null 2>&1 || echo "setup: could not install prometheus; the monitoring tests will skip" >&2
  else
    echo "setup: prometheus is not installed (needs root and apt-get); the monitoring tests will skip" >&2
  fi
fi
