#!/usr/bin/env bash
# The accelerator figures of the performance issue in one run: training throughput and MFU at
# GPT-2 124M and 1.5B (bf16 compute, fp32 params + AdamW, T=1024), XLA's memory plan for a 6.7B
# GPT-2-family model (L=32, D=4096) under each optimizer-state saver, and a few real steps of it
# with the memory capped at 80 GB.
#
#   bash experiments/gpu_bench.sh OUT_DIR [extra jaxft.bench flags]
#
# Writes OUT_DIR/<name>.json (jaxft.bench --json) and OUT_DIR/<name>.log per measurement and
# goes on past a failed one (an out-of-memory is a result too). Extra flags go to every bench
# command: `--target=h100` on a CPU box gives XLA's H100 plan of each (no step runs). Needs jaxft's
# dependencies (a GPU image with jax, flax, optax and orbax may lack ml-collections: pip-install
# it, or carry its wheel).
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR [extra bench flags]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."

bf16='--config=configs/demo.py --config.model.dtype=bfloat16 --config.model.vocab_size=50304
      --config.data.seq_len=1024 --no-input'
b67='--config.model.size=gpt2 --config.model.num_layers=32 --config.model.embed_dim=4096
     --config.model.num_heads=32 --config.train.batch_size=1 --config.model.remat=nothing_saveable'

bench() {  # name, then jaxft.bench arguments
  local name=$1
  shift
  echo "== $name: python -m jaxft.bench $*"
  python3 -m jaxft.bench "$@" --json="$out/$name.json" >"$out/$name.log" 2>&1 \
    || echo "   failed (exit $?): see $out/$name.log"
  grep -E '^(jaxft|state|step memory)' "$out/$name.log" | sed 's/^/   /'
}

# 124M: the default attention on GPU in bf16 is cuDNN flash attention; XLA's own for comparison.
bench gpt2 $bf16 --config.model.size=gpt2 --config.train.batch_size=16 --steps=20 "$@"
bench gpt2_xla_attention $bf16 --config.model.size=gpt2 --config.train.batch_size=16 \
  --config.model.attention=einsum --steps=20 "$@"
# 1.5B.
bench gpt2_xl $bf16 --config.model.size=gpt2-xl --config.train.batch_size=8 --steps=10 "$@"
# 6.7B: the plan per optimizer state, then real steps in what an 80 GB H100 gives JAX at
# XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (bench.GPU_MEM_FRACTION of its 81,008 MiB), as a fraction
# of this device's memory.
for moments in float32 int8; do
  bench plan_6.7b_$moments $bf16 $b67 --config.optim.moments_dtype=$moments --compile-only "$@"
done
bench plan_6.7b_offload $bf16 $b67 --config.optim.offload=True --compile-only "$@"
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
fraction=$(python3 -c "print(min(1.0, 0.95 * 81008 / ${total_mib:-81008}))")
XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction \
  bench run_6.7b_int8_80gb $bf16 $b67 --config.optim.moments_dtype=int8 --steps=3 --warmup=1 "$@"
