"""Every jaxft config key, with its default and why. Other config files override only what differs.

    python -m jaxft.train --config=configs/common.py --config.data.train=my.jsonl
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  if arg:  # (See demo.py for how variants work.)
    raise ValueError(f'configs/common.py has no variants (got {arg!r})')
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds init, dropout and data order; same seed + same data = same run.
  c.objective = 'next_token'  # What the loss is; one field switches it (see jaxft/objectives.py).
  c.reuse_host_memory = True  # glibc malloc keeps freed memory (jaxft.train.reuse_host_memory):
  # XLA CPU's per-step buffers are reused, not mapped and page-faulted afresh (CPU: 1.2-1.3x).
  c.compile_cache = '~/.cache/jaxft/xla'  # XLA's persistent compilation cache (jaxft.train): a
  # rerun or resume loads the compiled steps instead of compiling again (H200: gpt2 65 s, gpt2-xl
  # 105 s). Local or gs://; '' leaves JAX's own setting (JAX_COMPILATION_CACHE_DIR, else none).
  # Only compiles over 1 s are kept.
  c.threefry_gpu_kernel = False  # On GPU, jax.random's threefry as JAX's CUDA kernel instead of
  # XLA ops (jax_threefry_gpu_kernel_lowering): the same bits, compiled much faster (the H100 plan
  # of a 6.7B init: 58 -> 11 s on a 2-core CPU), but a draw's bits held whole (+10.5 GiB there).

  c.distributed = ml_collections.ConfigDict()  # Multi-host: one process per host, one global mesh.
  c.distributed.enabled = False  # Call jax.distributed.initialize(): TPU VMs, SLURM and Open MPI
  # find their peers alone; elsewhere (GPU clusters, local tests) give the three keys below.
  c.distributed.coordinator_address = ''  # 'host:port' of process 0 ('' = detect, or the
  # JAX_COORDINATOR_ADDRESS environment variable).
  c.distributed.num_processes = 0  # 0 = detect.
  c.distributed.process_id = -1  # -1 = detect.
  c.distributed.timeout_s = 300  # How long to wait for every process to join.

  c.model = ml_collections.ConfigDict()
  c.model.size = 'tiny'  # Named preset (tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl) ...
  c.model.num_layers = config_dict.placeholder(int)  # ... and any of these overrides it.
  c.model.num_heads = config_dict.placeholder(int)
  c.model.embed_dim = config_dict.placeholder(int)
  c.model.mlp_dim = config_dict.placeholder(int)  # None: 4 * embed_dim, as GPT-2.
  c.model.max_len = config_dict.placeholder(int)  # Learned positions: the longest sequence.
  c.model.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's, rounded up below.
  c.model.vocab_multiple = 128  # Pad the vocab to a multiple of this: MXU/tensor-parallel friendly.
  c.model.dropout = 0.0  # Residual, attention and embedding dropout; 0 for fine-tuning small data.
  c.model.ln_eps = 1e-5  # LayerNorm epsilon (HF layer_norm_epsilon; from-hf sets the checkpoint's).
  c.model.dtype = 'float32'  # Compute dtype ('bfloat16' halves activation memory); params stay fp32.
  # Speed and memory switches: none changes the result beyond float rounding (tests/test_switches.py;
  # with dropout on, causal_blocks draws its attention dropout per block, so other masks).
  c.model.attention = 'auto'  # 'einsum' (explicit softmax), 'causal_blocks' (skips the masked
  # upper triangle: faster on CPU), 'dot_product' (jax.nn.dot_product_attention: cuDNN flash
  # attention on GPU in bfloat16; no attention dropout) or 'auto': causal_blocks on CPU,
  # dot_product on GPU in bf16 without dropout (head dim a multiple of 8, <= 128), einsum otherwise.
  c.model.attention_block = 64  # causal_blocks: queries per block (the last one shorter where
  # it does not divide seq_len); a seq_len not above it gets one block, i.e. einsum.
  c.model.remat = 'none'  # Recompute activations in backward: a jax.checkpoint_policies name, e.g.
  # 'nothing_saveable' (least memory), 'dots_with_no_batch_dims_saveable' (keeps matmul outputs).
  c.model.scan_layers = False  # Trace one block and scan it over the layers: compile time flat in depth.
  c.model.grad_barrier = True  # Write the residual-stream gradient once at each block boundary
  # (model.grad_barrier): stops XLA recomputing it per layer (gpt2 on CPU: 1.25x faster).
  c.model.loss_chunk = 0  # LM loss over this many tokens at a time (logits recomputed in backward):
  # no full [batch, length, vocab] float32 logits; 0 = all at once.
  c.model.logsumexp = 'auto'  # The loss's logsumexp over the vocab: 'two_pass' (max, then sum),
  # 'one_pass' (running max and sum in one reduction: the float32 logits read once less) or
  # 'auto': one_pass on GPU, where those reads are the cost, two_pass elsewhere (CPU: faster).
  c.model.layernorm_vjp = False  # LayerNorm's backward from the saved per-row mean and 1/std:
  # no float32 [batch, length, embed] product written for the scale gradient's reduction.
  c.model.logits_dtype = 'float32'  # The loss's LM-head logits: 'float32', or 'compute'
  # (model.dtype: under bf16 the [tokens, vocab] logits are stored and read at half the bytes;
  # the logsumexp still sums in float32).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Pure data parallel replicas; -1 takes the devices left over.
  c.mesh.fsdp = 1  # Shard params + optimizer state over this many devices (and the batch too).
  c.mesh.tensor = 1  # Megatron-style split of heads / MLP / vocab.

  c.tokenizer = 'bytes'  # 'bytes' (built in, no files) or 'hf:<HF tokenizer dir or hub id>'.

  c.data = ml_collections.ConfigDict()
  c.data.source = 'files'  # 'files' (data.train/val/test below) or 'demo' (jaxft.demo_data).
  c.data.train = ''  # File or glob: .jsonl / .jsonl.gz (a JSON object per line), .csv / .tsv
  # (header line, a record per row) or .txt (one file = one {'text'} record); or a dataset split:
  # tfds:<name>[/<config>][:<split>] (extra [tfds]) or hf:<hub name or dir>[:<split>] (extra
  # [datasets]); the split defaults to train / validation / test.
  c.data.val = ''  # Empty: hold out val_fraction of the train records.
  c.data.test = ''  # Empty: hold out test_fraction of the train records left after val.
  c.data.tfds_data_dir = ''  # tfds: where the prepared datasets are ('' = TFDS's default).
  c.data.hf_name = ''  # hf: the dataset's config name, e.g. 'sst2' of 'nyu-mll/glue'.
  c.data.split_seed = 0  # Seeds the data itself: the demo corpus and which records val_fraction /
  # test_fraction hold out. Apart from c.seed: runs of other seeds score the same records.
  c.data.val_fraction = 0.05
  c.data.test_fraction = 0.05
  c.data.on_error = 'raise'  # Bad record (malformed line, missing field, bad label, bad UTF-8):
  # 'raise' stops naming file:line; 'skip' leaves it out, counted, listed in skipped_records.txt.
  c.data.seq_len = 128  # Tokens per row; next_token / labeled_pair pack several examples a row.
  c.data.pack = True  # Pack examples into rows as segments (attention stays inside each); False: one per row.
  c.data.text_field = 'text'  # Read by next_token and classification.
  c.data.prompt_field = 'prompt'  # labeled_pair: loss on the completion tokens (+ EOS) only.
  c.data.completion_field = 'completion'
  c.data.prompt_template = '{prompt}'  # labeled_pair: how the prompt is shown, e.g. 'Q: {prompt}\nA: '.
  c.data.truncation_side = 'left'  # Too long: 'left' cuts the prompt (classification: text) from the start; 'right' from the end.
  c.data.drop_unsupervised = False  # An example left with no supervised token: error (False) or drop and count.
  c.data.label_field = 'label'  # classification: an int in [0, num_labels) or one of label_names.
  c.data.num_labels = 0  # classification: number of classes; 0 = len(label_names).
  c.data.label_names = ''  # classification: comma-separated class names, e.g. 'neg,pos'.
  c.data.demo = ml_collections.ConfigDict()
  c.data.demo.num_examples = 20_000  # Size of the generated demo corpus.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Optimizer updates.
  c.train.batch_size = 32  # Global batch (sequences per update, over all hosts and micro-steps).
  c.train.grad_accum = 1  # Split each batch into this many micro-batches: same update, less memory.
  c.train.log_every = 10  # Steps between metrics.jsonl / TensorBoard train lines.
  c.train.eval_every = 100  # Steps between validation passes (and at the end).
  c.train.eval_batches = 20  # Cap on validation batches per pass; 0 = the whole split.
  c.train.init_from = ''  # jaxft workdir / step dir, or hf:<HF dir or hub id>: load shared params.
  c.train.trainable = 'all'  # 'all', 'head' (classification's score: frozen backbone) or a path regex.
  c.train.exact_match_examples = 256  # labeled_pair: greedy completions scored per eval; 0 = skip.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4  # Peak learning rate after warm-up.
  c.optim.schedule = 'cosine'  # 'cosine' (to min_lr_ratio * lr) or 'constant' after warm-up.
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1  # Cosine ends at this fraction of lr.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95  # GPT-3/nanoGPT value; more stable than 0.999 at small batch.
  c.optim.eps = 1e-8
  c.optim.moments_dtype = 'float32'  # 'bfloat16' keeps AdamW's mu and nu in bf16: half the
  # optimizer memory (keep b2 <= 0.99: bf16 cannot resolve nu's decay at 0.999); 'int8': 8-bit
  # codes + a float32 scale per row, ~2.1 bytes per param for both instead of 8.
  c.optim.weight_decay = 0.1
  # Params whose path matches get no weight decay: biases, LayerNorms and embeddings.
  c.optim.no_decay = r'(bias|ln_\w+|wte|wpe)'
  c.optim.clip_norm = 1.0  # Global-norm gradient clipping; 0 disables.
  c.optim.offload = False  # Keep AdamW's state in pinned host memory between steps (moved to the
  # device for the update): frees 2x the params' bytes of accelerator memory, costs the transfers.
  c.optim.skip_nonfinite = 0  # Non-finite gradients skipped (no update, counted) in a row; 0 = stop.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200  # Steps between saves (also saved at the end and on SIGTERM).
  c.checkpoint.keep = 3  # Keep the newest N checkpoints ...
  c.checkpoint.keep_best = True  # ... and also the one with the lowest validation loss.
  c.checkpoint.async_save = True  # Write in the background while training goes on.
  return c
