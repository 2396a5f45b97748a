#!/usr/bin/env bash
# The GPU paper-scale run (issue 13): wide ResNet-20 US/EU clients on CIFAR-10, merged.
#
# Run from the repository root on a machine with one H100/H200-class GPU:
#   bash scripts/gpu_paper_scale.sh [DATA_DIR] [OUT_DIR] [extra options...]
# DATA_DIR holds cifar10-jpeg.tar.gz (default: data/, git-ignored, carried with the checkout).
# Needs only torch, torchvision, numpy, scipy, rich, safetensors, typer (no flwr, pydantic).
# The whole run is capped at 8 minutes: SIGINT at 465 s, then the report of the finished
# settings is written (exit 124), and a kill 15 s later if that hangs (exit 137).
# paper_scale.json is rewritten after every finished setting. The script prints the
# projected total after each setting's first epoch. PYTHON picks the interpreter (default
# python3).
set -euo pipefail
DATA_DIR="${1:-data}"
OUT_DIR="${2:-results/paper-scale}"
shift $(( $# > 2 ? 2 : $# ))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout --signal=INT --kill-after=15 465 "${PYTHON:-python3}" -m simulations.paper_scale \
  --data-dir "$DATA_DIR" --out "$OUT_DIR" \
  --widths 4 --widths 8 --norms batch --norms layer --seeds 0 \
  --epochs 20 --batch-size 500 --max-lr 0.2 --label-smoothing 0.1 --bf16 auto \
  --device cuda --time-budget 450 "$@"
