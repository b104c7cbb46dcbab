#!/usr/bin/env bash
# Issue #8 on a GPU, in one call of a machine lent for minutes: the step breakdown and images/s
# of DeiT-Tiny split after block 3, with the accelerator choices visible (bfloat16 compute, buffer
# donation, the on-device augmentation), and PyTorch/timm's step on the same GPU as a yardstick.
#
#   OUT=runs/bench_gpu bash benchmarks/gpu.sh [deadline_s]
#
# Each configuration runs in its own process (its own compilation and peak memory), most
# important first; none is started after deadline_s (default 3000), so a time-limited call
# returns what it measured. Records go to $OUT/bench_step_gpu.jsonl as they come, the tables to
# $OUT/bench_step_gpu.md (benchmarks/step.py --summarize), a profile of Base's fused step at B = 128
# to $OUT/profile_gpu.{jsonl,md} (benchmarks/profile_step.py). Environment: PYTHON (ours, default
# python3), TORCH_PYTHON (an interpreter with torch + timm, default python3; empty: no PyTorch),
# MODEL, STEPS (timed calls per phase, default 20), EXTRA (more step.py arguments).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/bench_gpu}
mkdir -p "$out"
jsonl=$out/bench_step_gpu.jsonl
deadline=${1:-3000}
py=${PYTHON:-python3}
torch_py=${TORCH_PYTHON-python3}
model=${MODEL:-deit_tiny_patch16_224}
steps=${STEPS:-20}
read -r -a extra <<< "${EXTRA:-}"
# The processes share XLA's GEMM/fusion autotuning results (same shapes at the same batch): less
# compilation time, the same kernels chosen.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=${TMPDIR:-/tmp}/adc_jax_autotune"
start=$SECONDS

started() {  # false once the deadline has passed; logs what starts
  if ((SECONDS - start > deadline)); then
    echo "skipped (deadline): $*" >&2
    return 1
  fi
  echo "[$((SECONDS - start)) s] $*" >&2
}

ours() {
  started "$@" || return 0
  "$py" benchmarks/step.py --model "$model" --steps "$steps" --warmup 3 --xla-default \
    "${extra[@]}" "$@" >> "$jsonl" || echo "FAILED: $*" >&2
}

theirs() {
  [[ -n $torch_py ]] && started torch "$@" || return 0
  "$torch_py" benchmarks/torch_step.py --model "$model" --device cuda --split \
    --steps "$steps" --warmup 3 "$@" >> "$jsonl" || echo "FAILED: torch $*" >&2
}

nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || true
# B = 128: float32 and bfloat16, Base and ADC at ξ = 0.1; the input path; PyTorch.
ours --batch 128 --method base
ours --batch 128 --method adc --xi 0.1
# Where a Base step's time goes on this GPU, instruction by instruction.
if started profile --batch 128 --method base; then
  "$py" benchmarks/profile_step.py --model "$model" --batch 128 --method base --xla-default \
    "${extra[@]}" > "$out/profile_gpu.jsonl" 2> "$out/profile_gpu.md" || echo "FAILED: profile" >&2
fi
ours --batch 128 --method base --dtype bfloat16
ours --batch 128 --method adc --xi 0.1 --dtype bfloat16
ours --batch 128 --input
theirs --batch 128
# Donation off; the other ξ.
ours --batch 128 --method base --no-donate
ours --batch 128 --method adc --xi 0.5
ours --batch 128 --method adc --xi 0.01
# The other batch sizes of the CPU grid, then a batch that fills the GPU better.
for b in 64 32; do
  ours --batch $b --method base
  ours --batch $b --method adc --xi 0.1
done
for dtype in float32 bfloat16; do
  ours --batch 256 --method base --dtype $dtype
  ours --batch 256 --method adc --xi 0.1 --dtype $dtype
done
theirs --batch 256
for b in 64 32; do
  ours --batch $b --method adc --xi 0.5
  ours --batch $b --method adc --xi 0.01
done
"$py" benchmarks/step.py --summarize "$jsonl" > "$out/bench_step_gpu.md"
echo "[$((SECONDS - start)) s] done" >&2
cat "$out/bench_step_gpu.md"
