#!/usr/bin/env bash
# Regenerate requirements/image.lock and image-gpu.lock (hashed) from their .in files, for the
# image's Python (3.11, manylinux x86_64). Needs `uv` (pip install uv, in any venv)
# and PyPI; torch's CPU build comes from PyTorch's index, or from a folder holding
# the wheel (TORCH_WHEELS=/path: its hash is then of that copy, check it against
# https://download.pytorch.org/whl/cpu/torch/ before a release).
set -euo pipefail
cd "$(dirname "$0")/.."
args=(--index-url https://pypi.org/simple)
if [[ -n "${TORCH_WHEELS:-}" ]]; then
  args+=(--find-links "$TORCH_WHEELS")
else
  args+=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
uv pip compile requirements/image.in --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --no-header "${args[@]}" \
  --custom-compile-command "requirements/lock.sh" -o requirements/image.lock
# The GPU image: PyPI's torch wheel is the CUDA build, so PyPI alone.
uv pip compile requirements/image-gpu.in --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --no-header --index-url https://pypi.org/simple \
  -o requirements/image-gpu.lock
