#!/usr/bin/env bash
# Downloads, here (with network), the wheels that scripts/gpu_check.sh installs on the GPU machine,
# which has no network and an older transformers than this project needs. Into .whl/ (git-ignored);
# the whole working tree, wheels included, must stay under 64 MiB to travel.
#
#   bash scripts/gpu_wheels.sh            # then carry .whl to the GPU machine
#
# Pinned to the versions this project is tested with here. Only what the GPU image lacks or has too
# old: transformers (>= 5.20; the image has 5.17), peft (matched to that transformers), regex (the
# new transformers needs >= 2025.10.22), setuptools (>= 77 reads this project's SPDX license field).
# The rest (torch, tokenizers, safetensors, huggingface-hub, accelerate, hypothesis, pytest,
# nvidia-ml-py) is already there in versions that fit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${WHEEL_DIR:-$REPO/.whl}
WHEELS=(transformers==5.24.0 peft==0.21.2 regex==2026.5.9 setuptools==84.2.1)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

count=$(find "$DEST" -type f -name '*.whl' | wc -l)
[[ $count -eq ${#WHEELS[@]} ]] || { echo "expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2; exit 1; }
wheels_bytes=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
tree_bytes=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s}')
ls -l "$DEST"
echo "wheels: $wheels_bytes bytes; working tree that travels: $tree_bytes bytes + wheels = $((wheels_bytes + tree_bytes)) bytes (limit 67108864)"
(( wheels_bytes + tree_bytes < 60 * 1024 * 1024 )) || { echo "too large to travel" >&2; exit 1; }
