#!/usr/bin/env bash
# Convert a small real model from the Hub to NVFP4 and verify it against its source. Without a
# reachable Hub, do the same with the tiny checkpoint shipped in examples/tiny-llama.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:-Qwen/Qwen3-0.6B}
out=${OUT:-out}
if python - "$model" <<'PY' 2>/dev/null; then
import sys
from huggingface_hub import HfApi
HfApi().model_info(sys.argv[1], timeout=10)
PY
  src=$model
else
  echo "Hub not reachable: using the tiny checkpoint in examples/tiny-llama" >&2
  src=examples/tiny-llama
fi
dst="$out/$(basename "$src")-nvfp4"
nvfp4-convert "$src" "$dst"
nvfp4-convert verify "$dst" --source "$src"
