#!/usr/bin/env bash
# Set-up on a fresh machine: the CPU build of torch first (pinned, from local disk here), then
# the package with its test extra. The torch pin comes first so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]" "torch==2.13.0"
# open_clip_torch ships OpenAI's real CLIP BPE vocabulary, used by the tokenizer tests; its own
# dependencies (torchvision, timm) would pull a CUDA torch, and nothing imports it: --no-deps.
python3 -m pip install -q --no-deps "open-clip-torch==3.3.0"
# The DeepCache peer of the benchmark suite (works with diffusers 0.42; its pins are old): --no-deps.
python3 -m pip install -q --no-deps "deepcache==0.1.1"
