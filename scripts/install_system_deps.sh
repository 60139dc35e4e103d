#!/usr/bin/env bash
# System tools the test suite needs, installed idempotently (Debian/Ubuntu, as root or via sudo):
#   Java   — pycocoevalcap's PTB tokenizer and METEOR
#   TeX    — compiling the generated .tex tables (scripts/install_tex.sh)
#   SLURM  — a real single-node cluster for the cluster tests (scripts/slurm_local.sh install)
# Each step is skipped when the tool is already there. Without root, missing tools are reported
# and the tests that need them skip with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi
fi
export DEBIAN_FRONTEND=noninteractive

if ! command -v java >/dev/null 2>&1; then
    if [ "$SUDO" = none ]; then
        echo "install_system_deps: java missing and no root: caption-metric tests will skip" >&2
    else
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends default-jre-headless
    fi
fi

if [ "$SUDO" = none ]; then
    echo "install_system_deps: no root: TeX / SLURM not installed (their tests skip)" >&2
    exit 0
fi
bash scripts/install_tex.sh
bash scripts/slurm_local.sh install
