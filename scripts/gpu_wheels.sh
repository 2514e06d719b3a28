#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, transformers, peft, safetensors; no network, no torchao):
# downloaded here for its Python 3.12 / x86-64 into .whl/ (ignored by git), carried with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "torchao==0.18.0"
ls -la .whl
