#!/usr/bin/env bash
# Builds the documentation twice: HTML with every warning an error, then the doctest
# builder, which runs each {doctest} block of the pages (on the CPU, in seconds).
#   docs/build.sh                 # uses .venv/bin/python if present, else python3
#   PYTHON=python docs/build.sh
# Output under build/docs/ (git-ignored, as build/ is): html/index.html, and
# doctest/output.txt. Needs the docs extra: pip install -e ".[docs]".
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$( [ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3 )}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
out=../build/docs
"$PYTHON" -m sphinx -W --keep-going -d "$out/doctrees" -b html . "$out/html"
"$PYTHON" -m sphinx -W --keep-going -d "$out/doctrees" -b doctest . "$out/doctest"
