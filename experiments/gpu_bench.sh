#!/usr/bin/env bash
# The accelerator figures of the performance issue, in order of importance: training throughput
# and MFU at GPT-2 124M and 1.5B (bf16 compute, fp32 params + AdamW, T=1024), real steps of a
# 6.7B GPT-2-family model (L=32, D=4096, int8 AdamW moments, B=4 without remat; B=1 with full
# remat if that fails) in the memory an 80 GB H100 gives JAX, then 124M with XLA's attention
# instead of cuDNN's, without the grad barrier, at B=32, with the two-pass logsumexp and with the
# init drawn by JAX's CUDA threefry kernel, with LayerNorm's backward from saved statistics and
# bf16 logits for the loss, and XLA's plan for the 6.7B model with its optimizer
# state offloaded to the host.
#
#   [BENCHES='name ...'] [BENCH_TIMEOUT=300] bash experiments/gpu_bench.sh OUT_DIR [bench flags]
#
# Writes OUT_DIR/results.jsonl (each measurement's jaxft.bench --json, in this order) and
# OUT_DIR/bench.log (every command's output), and goes on past a failed one (an out-of-memory is
# a result too; each command has BENCH_TIMEOUT seconds). BENCHES runs only the measurements
# named (the names below; the B=1 remat fallback runs only after the B=4 attempt fails). The
# whole list does not fit one 10-minute command: on an H200 (2026-12-04) the 124M step compiled
# in 65 s and 1.5B in 105 s, and the 6.7B run was still silent after ~290 s (that bench printed no
# progress then), so run it alone (BENCHES=run_6.7b_int8_80gb BENCH_TIMEOUT=560). XLA's H100
# compile of that step took 230 s on a 2-core CPU box then, 92-97 s since the int8 moments'
# stochastic rounding draws from optim.hash_uniform instead of jax.random (and one reduction per
# param gives both moments' row scales).
# `--target=h100` as the extra flag gives XLA's H100 plan of every command on a CPU box (README,
# Benchmark); the offload plan is refused there. On a GPU image with jax, optax, orbax and flax
# but not ml-collections, carry that and tensorboardX as wheels (experiments/README.md,
# Accelerator figures).
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR [extra bench flags]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

bf16='--config=configs/demo.py --config.model.dtype=bfloat16 --config.model.vocab_size=50304
      --config.data.seq_len=1024 --no-input'
b67='--config.model.size=gpt2 --config.model.num_layers=32 --config.model.embed_dim=4096
     --config.model.num_heads=32'
lean='--config.train.batch_size=1 --config.model.remat=nothing_saveable'

bench() {  # name, then jaxft.bench arguments; fails if the command did
  local name=$1 rc=0
  shift
  [ -z "${BENCHES:-}" ] || [[ " $BENCHES " == *" $name "* ]] || return 0
  echo "== $name: python -m jaxft.bench $*" | tee -a "$out/bench.log"
  timeout "${BENCH_TIMEOUT:-300}" python3 -m jaxft.bench "$@" --json="$out/$name.json" \
    >"$out/$name.log" 2>&1 || rc=$?
  [ $rc = 0 ] || echo "   failed (exit $rc)" | tee -a "$out/bench.log"
  grep -E '^(jaxft|state|step memory|init:)' "$out/$name.log" | sed 's/^/   /'
  cat "$out/$name.log" >>"$out/bench.log"
  [ -s "$out/$name.json" ] && cat "$out/$name.json" >>"$out/results.jsonl"
  rm -f "$out/$name.json" "$out/$name.log"
  return $rc
}

# 124M: the default attention on GPU in bf16 is cuDNN flash attention.
bench gpt2 $bf16 --config.model.size=gpt2 --config.train.batch_size=16 --steps=20 "$@"
# 1.5B.
bench gpt2_xl $bf16 --config.model.size=gpt2-xl --config.train.batch_size=8 --steps=10 "$@"
# 6.7B: real steps in what an 80 GB H100 gives JAX at XLA_PYTHON_CLIENT_MEM_FRACTION=.95
# (bench.GPU_MEM_FRACTION of its 81,008 MiB), as a fraction of this device's memory.
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
fraction=$(python3 -c "print(min(1.0, 0.95 * 81008 / ${total_mib:-81008}))")
# XLA's H100 plans: 62.2 GiB of 75.2 at B=4 without remat, 50.5 at B=1 with full remat (tried
# if the first fails, unless it ran out of time: the second would compile as long).
export XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction
# The init's random draws by JAX's CUDA threefry kernel (threefry_gpu_kernel): its H100 plan
# compiles in 11 s instead of 58 s on a 2-core CPU box, and holds 47.8 GiB at its peak.
bench run_6.7b_int8_80gb $bf16 $b67 --config.optim.moments_dtype=int8 --config.train.batch_size=4 \
    --config.threefry_gpu_kernel=True --steps=3 --warmup=1 "$@" \
  || { [ $? = 124 ] || bench run_6.7b_int8_80gb_remat $bf16 $b67 $lean \
         --config.optim.moments_dtype=int8 --config.threefry_gpu_kernel=True --steps=3 --warmup=1 \
         "$@"; }
unset XLA_PYTHON_CLIENT_MEM_FRACTION
# 124M with XLA's own attention: the speed of cuDNN's, and (same batch, seed and steps) its final
# loss should agree with the first line's to bf16 rounding.
bench gpt2_xla_attention $bf16 --config.model.size=gpt2 --config.train.batch_size=16 \
  --config.model.attention=einsum --steps=20 "$@"
# 124M without the residual-gradient barrier (a CPU-motivated default: does it cost on GPU?) and
# at twice the batch (does a larger step lift MFU?).
bench gpt2_no_grad_barrier $bf16 --config.model.size=gpt2 --config.train.batch_size=16 \
  --config.model.grad_barrier=False --steps=20 "$@"
bench gpt2_b32 $bf16 --config.model.size=gpt2 --config.train.batch_size=32 --steps=20 "$@"
# 124M with jax.nn.logsumexp's max-then-sum (model.logsumexp, two passes over the float32 logits;
# 'auto' is one_pass on GPU): does reading the logits once less pay on the device?
bench gpt2_two_pass_logsumexp $bf16 --config.model.size=gpt2 --config.train.batch_size=16 \
  --config.model.logsumexp=two_pass --steps=20 "$@"
# 124M with the init drawn by JAX's CUDA threefry kernel: the same params, so the same final loss
# as the first line's to the bit, and a shorter init_compile_s.
bench gpt2_threefry_kernel $bf16 --config.model.size=gpt2 --config.train.batch_size=16 \
  --config.threefry_gpu_kernel=True --steps=20 "$@"
# 124M with LayerNorm's backward from saved row statistics, then also with bf16 logits for the
# loss: XLA's H100 plan counts 64.7 -> 62.5 -> 57.5 GB of kernel traffic per step (and 10.8 ->
# 10.8 -> 7.8 GiB); do the steps follow? The first's final loss should be the gpt2 row's within
# float32 rounding, the second's within bf16 rounding of the logits.
bench gpt2_layernorm_vjp $bf16 --config.model.size=gpt2 --config.train.batch_size=16 \
  --config.model.layernorm_vjp=True --steps=20 "$@"
bench gpt2_lean_loss $bf16 --config.model.size=gpt2 --config.train.batch_size=16 \
  --config.model.layernorm_vjp=True --config.model.logits_dtype=compute --steps=20 "$@"
bench plan_6.7b_offload $bf16 $b67 $lean --config.optim.offload=True --compile-only "$@"
