#!/usr/bin/env bash
# Install the minimal TeX needed to compile the generated tables (pdflatex + booktabs).
# Idempotent: does nothing when pdflatex and booktabs.sty are already present.
# Debian/Ubuntu: texlive-latex-base (pdflatex, article) + texlive-latex-recommended (booktabs).
set -euo pipefail

if command -v pdflatex >/dev/null 2>&1 && kpsewhich booktabs.sty >/dev/null 2>&1; then
    echo "install_tex: pdflatex and booktabs.sty already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    texlive-latex-base texlive-latex-recommended

kpsewhich booktabs.sty >/dev/null || { echo "install_tex: booktabs.sty not found" >&2; exit 1; }
echo "install_tex: pdflatex $(command -v pdflatex), booktabs $(kpsewhich booktabs.sty)"
