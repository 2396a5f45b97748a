#!/usr/bin/env bash
# Issue 13: the long CPU runs (CIFAR-10 US/EU one-shot, full region data, full test set,
# 3 seeds). Each `run` line is one `rebasin simulate` run; they run one after another on a
# 2-core machine (2 threads). ONLY="vgg-w0.25-bn resnet20-w1-ln" runs just those (names as in
# the output folders, without "cifar10-us-eu-"); EPOCHS sets the epochs (default 20: at 15 a
# client stayed below 75 %); CENTRALIZED=--no-centralized skips the pooled-data baseline of
# the first run. Runs resume: started again, a run keeps the seeds its results.json holds and
# the clients an unfinished seed trained (its folder's clients/).
# OUT_ROOT (default results) is where the run folders go: OUT_ROOT=docs/results writes each
# seed's results.json where it can be committed, so a run spans sessions (commit, resume).
# BF16=off|on|auto, where set, is passed as --bf16 (unset: the CLI's default, auto for CIFAR,
# which resolves per CPU, so such a run resumes only on a CPU of the same kind); BF16=off
# trains fp32 everywhere and so resumes on any CPU.
# Recipe: crop + flip (CIFAR default), channels_last (default for conv models), bf16 auto
# (off on CPUs without AVX512-BF16/AMX), SGD Nesterov, one-cycle with peak 0.1, label
# smoothing 0.1, weight decay 5e-4, batch 128.
set -euo pipefail
DATA="${REBASIN_DATA_DIR:-data}"
EPOCHS="${EPOCHS:-20}"
OUT_ROOT="${OUT_ROOT:-results}"
bf16=()
if [[ -n "${BF16:-}" ]]; then bf16=(--bf16 "$BF16"); fi
common=(--scenario us-eu --dataset cifar10 --seeds 0 1 2 --epochs "$EPOCHS" --lr 0.1
        --schedule onecycle --max-lr 0.1 --nesterov --label-smoothing 0.1 --weight-decay 5e-4
        --batch-size 128 "${bf16[@]}" --threads 2 --data-dir "$DATA" --resume)
run() {  # run NAME ARGS...: one simulation into $OUT_ROOT/cifar10-us-eu-NAME
  local name=$1
  shift
  if [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]]; then
    rebasin simulate "${common[@]}" "$@" --out "$OUT_ROOT/cifar10-us-eu-$name"
  fi
}
run vgg-w0.25-bn --model vgg --width 0.25 --norm batch ${CENTRALIZED:-}
run vgg-w0.5-bn --model vgg --width 0.5 --norm batch --no-centralized
run resnet20-w1-ln --model resnet20 --width 1 --norm layer --no-centralized
run resnet20-w1-bn --model resnet20 --width 1 --norm batch --no-centralized
