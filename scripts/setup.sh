#!/usr/bin/env bash
# Set-up on a fresh machine: the CPU build of torch first (pinned, from local disk here), then
# the package with its test extra, every reference package at the exact version constraints.txt
# names. The torch pin comes first so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python3 -m pip install -q --disable-pip-version-check -c constraints.txt "$@"; }
pip_install "torch==2.13.0"
pip_install -e ".[test]"
# open_clip_torch ships OpenAI's real CLIP BPE vocabulary, used by the tokenizer tests; its own
# dependencies (torchvision, timm) would pull a CUDA torch, and nothing imports it: --no-deps.
pip_install --no-deps open-clip-torch
# The DeepCache peer of the benchmark suite (works with diffusers 0.42; its pins are old): --no-deps.
pip_install --no-deps deepcache
# The C kernels this CPU can run, compiled into the kernel cache now, so that no test or first call
# pays the compiler (an editable install builds nothing itself; a wheel carries them prebuilt).
# Never fails the set-up: a kernel that cannot build falls back to PyTorch's operators.
python3 -m runtime.kernels.build
