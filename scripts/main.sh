#!/usr/bin/env bash
# The main job on a fresh machine: set up, then generate an image and print the time per stage.
#   bash scripts/main.sh [MODEL_FOLDER_OR_HUB_ID] [PROMPT]
# Without a model it uses the model the package ships; if there is none, a small random-weight
# checkpoint built in diffusers' layout (its image is noise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model="${1:-}"
prompt="${2:-a large red circle on a blue background, in the centre}"
if [ -z "$model" ]; then
  shipped=$(python3 -c "from runtime.cli import default_model; print(default_model() or '')")
  if [ -n "$shipped" ]; then
    model="$shipped"
  else
    python3 -m bench.make_checkpoint --model tiny --out build/demo-checkpoint
    model=build/demo-checkpoint
  fi
fi
python3 -m runtime generate "$model" --prompt "$prompt" --steps 20 --seed 0 --output out.png
