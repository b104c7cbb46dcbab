#!/usr/bin/env bash
# The measurement for a GPU, in one short call: DeiT-Tiny split after block 3, bfloat16, B = 256.
#
#   OUT=runs/bench_gpu bash benchmarks/gpu.sh [deadline_s] [parts]
#
# parts (comma-separated, default all, run in this order, most important first):
#   step     ADC (ξ = 0.1) and Base, split and fused steps alternated in one process
#            (benchmarks/step.py --paired-base): images/s, ADC/Base, split/fused
#   torch    timm's step in PyTorch on the same GPU, bfloat16 autocast, eager and torch.compile
#            (benchmarks/torch_step.py --amp [--compile]), whole model and split
#   profile  where Base's fused step spends its time (benchmarks/profile_step.py)
#   train    python train.py: configs/deit_t_fashion_mnist.py with ADC and with Base, and
#            configs/vit_fashion_mnist.py (test accuracy, images/s, seconds to target)
#   detail   per-program times and peak memory of Base and ADC, and Base with XLA's attention
#            instead of cuDNN's (benchmarks/step.py)
# No part is started after deadline_s (default 480) seconds, so a time-limited call returns what
# it measured; split the parts over two calls when one is too short (e.g. "step,torch,profile",
# then "train,detail"). Everything lands in $OUT: bench.jsonl, profile.jsonl, train.jsonl,
# report.md (benchmarks/gpu_report.py; pass several OUT folders to it to merge calls), log.txt,
# nvidia_smi.txt.
#
# Environment: PYTHON (ours, default python3), TORCH_PYTHON (torch + timm, default python3; empty:
# no PyTorch), BATCH (256), STEPS (timed calls, 20), DTYPE (bfloat16), EVALS (test evaluations per
# training run, 10), FASHION_DIR (the four Fashion-MNIST IDX .gz files, default
# /usr/share/datasets/fashion-mnist; a machine without internet needs them there or carried),
# DATA_DIR (where tfds data are prepared, default $OUT/../tfds), TRAIN_ARGS (more --config.x=...
# for every training run), TINY=1 (the plumbing at toy sizes, for a CPU: the tiny test ViT,
# B = 8, one timed call, the configs' :runlocal variants).
# A machine whose Python lacks tensorflow-datasets, array-record, dm-pix or ml-collections (the
# training and input parts need them) can get them as wheels in .whl/ (installed to /tmp/site
# first, see the README's GPU section).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/bench_gpu}
mkdir -p "$out"
deadline=${1:-480}
parts=",${2:-step,torch,profile,train,detail},"
py=${PYTHON:-python3}
torch_py=${TORCH_PYTHON-python3}
batch=${BATCH:-256}
steps=${STEPS:-20}
dtype=${DTYPE:-bfloat16}
evals=${EVALS:-10}
fashion=${FASHION_DIR:-/usr/share/datasets/fashion-mnist}
data_dir=${DATA_DIR:-$out/../tfds}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
model=(--model deit_tiny_patch16_224 --split-index 3)
variant=""
warmup=3
if [[ ${TINY:-0} == 1 ]]; then
  model=(--model vit_test_patch4_16 --split-index 2 --num-classes 10)
  variant=":runlocal"
  batch=8 steps=1 warmup=1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# The processes share XLA's GEMM/fusion autotuning results (same shapes): less compilation.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=${TMPDIR:-/tmp}/adc_jax_autotune"
exec > >(tee -a "$out/log.txt") 2>&1
start=$SECONDS

started() {  # false once the deadline has passed; logs what starts
  if ((SECONDS - start > deadline)); then
    echo "skipped (deadline): $*"
    return 1
  fi
  echo "[$((SECONDS - start)) s] $*"
}

part() { [[ $parts == *",$1,"* ]]; }

ours() {
  started "$@" || return 0
  "$py" benchmarks/step.py "${model[@]}" --batch "$batch" --dtype "$dtype" --steps "$steps" \
    --warmup "$warmup" --xla-default --attention "$attention" "$@" >> "$out/bench.jsonl" ||
    echo "FAILED: $*"
}

theirs() {
  [[ -n $torch_py ]] && started torch "$@" || return 0
  "$torch_py" benchmarks/torch_step.py "${model[@]}" --batch "$batch" --device cuda --split \
    --steps "$steps" --warmup "$warmup" "$@" >> "$out/bench.jsonl" || echo "FAILED: torch $*"
}

train() {  # train NAME CONFIG ARGS...: one run of train.py, its summary into train.jsonl
  local name=$1 config=$2
  shift 2
  started train "$name" || return 0
  local workdir=$out/../train_$name
  rm -rf "$workdir"
  "$py" train.py --config "configs/$config.py$variant" --workdir "$workdir" \
    --config.dataset.data_dir="$data_dir" --config.dataset.source_dir="$fashion" \
    --config.progress=False --config.model.attention="$attention" "$@" "${train_args[@]}" &&
    "$py" benchmarks/gpu_report.py --collect "$workdir" "$config" >> "$out/train.jsonl" ||
    echo "FAILED: train $name"
}

nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || true
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" || echo "FAILED: jax"
"$py" -c "import tensorflow_datasets, array_record, dm_pix, ml_collections" 2>/dev/null ||
  echo "missing for train: tensorflow-datasets / array-record / dm-pix / ml-collections"
# The blocks' attention under "auto" (cuDNN's kernel on a GPU in bfloat16): forward and backward
# once at DeiT-Tiny's shape, so that a cuDNN failure costs seconds, not every part (they then run
# with XLA's attention).
attention=auto
"$py" - "$dtype" <<'EOF' || { attention=xla && echo "attention: auto failed; every part uses xla"; }
import sys

import jax
import jax.numpy as jnp

from adc_jax import vit

q = jnp.ones((2, 197, 3, 64), sys.argv[1])
grad = jax.jit(jax.grad(lambda q: vit.dot_product_attention(q, q, q).astype(jnp.float32).sum()))
kind = "cuDNN" if "cudnn" in grad.lower(q).as_text().lower() else "XLA"
jax.block_until_ready(grad(q))
print(f"attention: auto is {kind} on {jax.devices()[0].device_kind} in {sys.argv[1]}")
EOF

if part step; then
  ours --method adc --xi 0.1 --paired-base
fi
if part torch; then
  theirs --amp
  theirs --amp --compile
fi
if part profile && started profile; then
  "$py" benchmarks/profile_step.py "${model[@]}" --batch "$batch" --dtype "$dtype" \
    --method base --xla-default > "$out/profile.jsonl" 2> "$out/profile.md" ||
    echo "FAILED: profile"
fi
if part train; then
  for method in adc base; do
    every=$("$py" benchmarks/gpu_report.py --eval-every "configs/deit_t_fashion_mnist.py$variant" \
      "$evals" "$method")
    train "deit_t_$method" deit_t_fashion_mnist --config.method.name="$method" \
      --config.eval_every_steps="${every:-0}"
  done
  train vit_fashion_mnist vit_fashion_mnist
fi
if part detail; then
  ours --method base
  ours --method adc --xi 0.1
  ours --method base --attention xla
fi
"$py" benchmarks/gpu_report.py "$out" > "$out/report.md"
echo "[$((SECONDS - start)) s] done"
cat "$out/report.md"
