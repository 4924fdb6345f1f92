"""GPT-2 in Flax NNX. Parameters name logical axes only; jaxft/sharding.py maps them to the mesh.

Parameter names and layouts follow HF GPT-2 (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f) so that HF conversion is a rename/reshape table. Attention weights keep
the head axis explicit ([embed, 3, heads, head_dim]) so tensor parallelism can split heads.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.config import ConfigError

ATTENTION = ('auto', 'einsum', 'causal_blocks', 'dot_product')
LOGSUMEXP = ('auto', 'two_pass', 'one_pass')
LOGITS_DTYPES = ('float32', 'compute')
DTYPES = ('float32', 'bfloat16', 'float16')  # model.dtype: the compute dtype.
HEAD = 'score'  # The classification head: the one param only some objectives have.

# Named sizes: (num_layers, num_heads, embed_dim, max_len). Vocab comes from the tokenizer.
SIZES = {
    'tiny': (2, 4, 128, 256),
    'gpt2': (12, 12, 768, 1024),
    'gpt2-medium': (24, 16, 1024, 1024),
    'gpt2-large': (36, 20, 1280, 1024),
    'gpt2-xl': (48, 25, 1600, 1024),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int  # Rows of wte: the tokenizer's vocab padded up (see config_from).
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  max_len: int
  dropout: float = 0.0
  ln_eps: float = 1e-5
  dtype: str = 'float32'  # Compute dtype; parameters are always float32.
  # Speed and memory switches (configs/common.py says when each helps); none changes the math.
  attention: str = 'auto'  # 'einsum', 'causal_blocks' or 'dot_product' (config_from resolves 'auto').
  flash: bool = False  # 'dot_product' as cuDNN flash attention (config_from: GPU, bf16/fp16).
  attention_block: int = 64  # causal_blocks: queries per block.
  remat: str = 'none'  # 'none' or a jax.checkpoint_policies name, per block.
  scan_layers: bool = False  # One traced block scanned over the stacked layer params.
  grad_barrier: bool = True  # Write the residual-stream gradient once per block boundary.
  loss_chunk: int = 0  # Tokens per chunk of LM-head logits in the loss; 0 = all at once.
  logsumexp: str = 'two_pass'  # The loss's logsumexp: 'one_pass' reads the logits once.
  layernorm_vjp: bool = False  # LayerNorm's backward from saved row statistics.
  logits_dtype: str = 'float32'  # The loss's LM-head logits: 'float32' or 'compute' (model.dtype).
  tokenizer_vocab: int = 0  # Ids the tokenizer uses; logits of the padding ids beyond are masked.
  num_labels: int = 0  # > 0 adds the classification head `score` (HF GPT2ForSequenceClassification).

  @property
  def head_dim(self):
    return self.embed_dim // self.num_heads


def config_from(model_cfg, tokenizer_vocab_size, num_labels=0, platform=None):
  """Resolve `config.model` (preset + overrides) into a GPTConfig. `platform` (default: this
  process's backend) is the one the model will run on, which picks what attention 'auto' means:
  the mesh's devices, which differ for a compile-only target (jaxft.bench --target)."""
  platform = platform or jax.default_backend()
  if model_cfg.size not in SIZES:
    raise ConfigError(f'unknown model.size {model_cfg.size!r}; known: {", ".join(SIZES)}')
  layers, heads, embed, max_len = SIZES[model_cfg.size]
  layers = model_cfg.num_layers or layers
  heads = model_cfg.num_heads or heads
  embed = model_cfg.embed_dim or embed
  if embed % heads:
    raise ConfigError(f'model.embed_dim={embed} is not divisible by model.num_heads={heads}')
  vocab = model_cfg.vocab_size
  if vocab is None:
    m = model_cfg.vocab_multiple
    vocab = -(-tokenizer_vocab_size // m) * m
  if vocab < tokenizer_vocab_size:
    raise ConfigError(f'model.vocab_size={vocab} < tokenizer vocab {tokenizer_vocab_size}')
  # A config saved before a switch existed (an older run's config.json) gets its default.
  switch = lambda name: model_cfg.get(name, GPTConfig.__dataclass_fields__[name].default)
  if model_cfg.dtype not in DTYPES:
    raise ConfigError(f'unknown model.dtype {model_cfg.dtype!r}; known: {", ".join(DTYPES)}')
  if not 0 <= model_cfg.dropout < 1:
    raise ConfigError(f'model.dropout={model_cfg.dropout} must be in [0, 1)')
  attention = switch('attention')
  # cuDNN's flash kernel: on GPU in bf16/fp16; jax.nn.dot_product_attention falls back to XLA's.
  flash = platform == 'gpu' and model_cfg.dtype != 'float32'
  # Its head dims: multiples of 8 up to 128 (256 from Hopper on); others raised
  # NotImplementedError inside the traced step.
  head_dim = embed // heads
  if attention not in ATTENTION:
    raise ConfigError(f'unknown model.attention {attention!r}; known: {", ".join(ATTENTION)}')
  if attention == 'auto':  # The fastest exact one for the platform (README, Benchmark).
    fits_flash = head_dim % 8 == 0 and head_dim <= 128
    attention = ('causal_blocks' if platform == 'cpu' else
                 'dot_product' if flash and fits_flash and not model_cfg.dropout else 'einsum')
  if attention == 'dot_product' and flash and (head_dim % 8 or head_dim > 256):
    raise ConfigError(f"model.attention='dot_product' is cuDNN's flash attention on GPU in "
                      f"{model_cfg.dtype}, which takes head dims that are multiples of 8 up to "
                      f"128 (256 on Hopper); model.embed_dim / model.num_heads = {head_dim}: "
                      f"use model.attention='einsum' (or 'auto')")
  if attention == 'dot_product' and model_cfg.dropout:
    raise ConfigError("model.attention='dot_product' has no dropout on attention probabilities; "
                      "set model.dropout=0 or model.attention='einsum'")
  logsumexp = switch('logsumexp')
  if logsumexp not in LOGSUMEXP:
    raise ConfigError(f'unknown model.logsumexp {logsumexp!r}; known: {", ".join(LOGSUMEXP)}')
  if logsumexp == 'auto':  # One pass where the logits' reads cost most (README, Benchmark).
    logsumexp = 'one_pass' if platform == 'gpu' else 'two_pass'
  logits_dtype = switch('logits_dtype')
  if logits_dtype not in LOGITS_DTYPES:
    raise ConfigError(f'unknown model.logits_dtype {logits_dtype!r}; known: '
                      f'{", ".join(LOGITS_DTYPES)}')
  remat = switch('remat')
  # The policies themselves; the module's other names (save_only_these_names, ...) make one from
  # arguments a config string cannot give, and failed inside the traced step.
  policies = [p for p in dir(jax.checkpoint_policies)
              if p.endswith('saveable') or p.startswith('checkpoint_dots')]
  if remat != 'none' and remat not in policies:
    raise ConfigError(f'unknown model.remat {remat!r}; known: none, ' + ', '.join(
        p for p in policies if p.endswith('saveable')))
  return GPTConfig(vocab_size=vocab, tokenizer_vocab=tokenizer_vocab_size, num_layers=layers,
                   num_heads=heads, embed_dim=embed,
                   mlp_dim=model_cfg.mlp_dim or 4 * embed, max_len=model_cfg.max_len or max_len,
                   dropout=model_cfg.dropout, ln_eps=switch('ln_eps'), dtype=model_cfg.dtype,
                   num_labels=num_labels,
                   attention=attention, attention_block=switch('attention_block'),
                   flash=flash and attention == 'dot_product',
                   remat=remat, scan_layers=switch('scan_layers'),
                   grad_barrier=switch('grad_barrier'), loss_chunk=switch('loss_chunk'),
                   logsumexp=logsumexp, layernorm_vjp=switch('layernorm_vjp'),
                   logits_dtype=logits_dtype)


def path_str(key_path):
  """Tree key path -> 'h/0/attn/c_attn_kernel' (the Variable's own `.value` key dropped)."""
  parts = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in key_path]
  if parts and parts[-1] == 'value':
    parts = parts[:-1]
  return '/'.join(str(p) for p in parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_matmul(h_ND, w_VD, out_dtype=jnp.float32):
  """The LM head's logits h @ w^T [..., vocab], accumulated in float32 and returned in out_dtype.
  Autodiff of a dot with preferred_element_type=float32 hands its float32 cotangent to both
  backward matmuls ([..., vocab] x [vocab, embed] and the wte gradient), so under bf16 compute
  they would run in float32, the step's largest matmuls after the forward's; here the logit
  gradient is cast to the compute dtype first, as every other matmul's backward already is.
  Identical in float32."""
  return jnp.einsum('...d,vd->...v', h_ND, w_VD, preferred_element_type=jnp.float32
                    ).astype(out_dtype)


def _head_matmul_bwd(out_dtype, res, g_NV):
  h_ND, w_VD = res
  g_NV = g_NV.astype(h_ND.dtype)
  return (jnp.einsum('...v,vd->...d', g_NV, w_VD),
          jnp.einsum('...v,...d->vd', g_NV, h_ND, preferred_element_type=jnp.float32
                     ).astype(w_VD.dtype))


head_matmul.defvjp(lambda h_ND, w_VD, out_dtype: (head_matmul(h_ND, w_VD, out_dtype), (h_ND, w_VD)),
                   _head_matmul_bwd)


def _merge_exp_sums(a, b):
  """Two partial (max, sum of exp(x - max)) pairs as one: the smaller sum is rescaled to the
  larger max (one exp, of a number <= 0)."""
  (m1, s1), (m2, s2) = a, b
  first = m1 >= m2
  hi, lo = jnp.where(first, m1, m2), jnp.where(first, m2, m1)
  return hi, jnp.where(first, s1, s2) + jnp.where(first, s2, s1) * jnp.exp(lo - hi)


@jax.custom_vjp
def one_pass_logsumexp(x):
  """logsumexp over the last axis, reading x once: one reduction carries the running max and the
  sum of exp(x - max) rescaled as the max grows (online softmax), where jax.nn.logsumexp makes
  two passes (the max, then the sum). Same value within float32 rounding. Pays where the logits
  stream from memory (GPU: XLA's H100 plan of gpt2 B=16 reads the [tokens, vocab] float32
  logits once less, 3.3 GB); on CPU the merge's exp and selects cost ~2.4x the two passes."""
  low = jnp.finfo(x.dtype).min  # Not -inf: two empty partials merge to (low, 0), not to NaN.
  m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.array(low, x.dtype), jnp.array(0, x.dtype)),
                        _merge_exp_sums, (x.ndim - 1,))
  return m + jnp.log(s)


def _one_pass_logsumexp_fwd(x):
  lse = one_pass_logsumexp(x)
  return lse, (x, lse)


one_pass_logsumexp.defvjp(_one_pass_logsumexp_fwd,
                          lambda res, g: (g[..., None] * jnp.exp(res[0] - res[1][..., None]),))


def cross_entropy(logits_NV, targets_N, one_pass=False):
  """-log softmax(logits)[target], as optax.softmax_cross_entropy_with_integer_labels computes it
  (logsumexp minus the target's logit; with one_pass, one_pass_logsumexp's), with the target's
  logit picked by a compare-and-sum over the vocab instead of a gather. The gather's backward is
  a scatter into the [tokens, vocab] gradient, which XLA cannot fuse with the softmax gradient
  and its cast to the compute dtype; a select can (XLA's H100 plan of gpt2: one float32 [tokens,
  vocab] write and read less)."""
  hit_NV = jnp.arange(logits_NV.shape[-1]) == targets_N[..., None]
  lse_N = one_pass_logsumexp(logits_NV) if one_pass else jax.nn.logsumexp(logits_NV, -1)
  return lse_N - jnp.sum(jnp.where(hit_NV, logits_NV, 0.), -1)


def map_with_path(fn, tree, *rest):
  """jax.tree.map with the parameter path string as the first argument."""
  return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def _param(rngs, shape, axes, std=None):
  """A float32 Param, normal(std) or zeros, annotated with logical axis names."""
  value = jnp.zeros(shape) if std is None else std * jax.random.normal(rngs.params(), shape)
  return nnx.Param(value, out_sharding=axes)


@jax.custom_vjp
def grad_barrier(x_BLD):
  """The identity, whose backward materialises the cotangent: XLA (CPU) otherwise fuses the
  residual-stream gradient's whole elementwise chain (residual adds + LayerNorm backward of every
  block above) into each consumer that transposes it for a weight gradient, recomputing it once
  per layer: quadratic in depth (gpt2: ~25% of the step). lax.optimization_barrier is dropped
  before fusion on CPU; a dynamic_update_slice can only be a fusion's root, so its result is
  written once. It rewrites position 0 with itself (local on every shard: seq is never split)."""
  return x_BLD


grad_barrier.defvjp(
    lambda x_BLD: (x_BLD, None),
    lambda _, g_BLD: (jax.lax.dynamic_update_slice(g_BLD, g_BLD[:, :1], (0, 0, 0)),))


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _layer_norm(x_BLD, scale_D, bias_D, eps):
  """(y, its mean and 1/std per row). Statistics in fp32 even under bf16 compute: LayerNorm is
  where bf16 loses precision."""
  x = x_BLD.astype(jnp.float32)
  mean_BL1 = x.mean(-1, keepdims=True)
  rstd_BL1 = jax.lax.rsqrt(jnp.square(x - mean_BL1).mean(-1, keepdims=True) + eps)
  return ((x - mean_BL1) * rstd_BL1 * scale_D + bias_D).astype(x_BLD.dtype), (mean_BL1, rstd_BL1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_saved_stats(x_BLD, scale_D, bias_D, eps):
  """LayerNorm whose backward keeps only x and the per-row mean and 1/std (float32 [B, L, 1])
  and recomputes the normalised x from them: no row reduction left in the backward's scale and
  bias gradients. Autodiff instead recomputes the statistics and hands the float32 [B, L, D]
  product g * x_hat to a separate column reduction (XLA's H100 plan of gpt2 B=16: one float32
  write and read of it per LayerNorm). The same math within float32 rounding."""
  return _layer_norm(x_BLD, scale_D, bias_D, eps)[0]


def _layer_norm_fwd(x_BLD, scale_D, bias_D, eps):
  y_BLD, stats = _layer_norm(x_BLD, scale_D, bias_D, eps)
  return y_BLD, (x_BLD, scale_D, jax.lax.optimization_barrier(stats))


def _layer_norm_bwd(eps, res, g_BLD):
  x_BLD, scale_D, (mean_BL1, rstd_BL1) = res
  xhat = (x_BLD.astype(jnp.float32) - mean_BL1) * rstd_BL1
  g = g_BLD.astype(jnp.float32)
  gs = g * scale_D
  dx = rstd_BL1 * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  rows = tuple(range(x_BLD.ndim - 1))
  return dx.astype(x_BLD.dtype), jnp.sum(g * xhat, rows), jnp.sum(g, rows)


layer_norm_saved_stats.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):

  def __init__(self, cfg: GPTConfig, rngs):
    self.eps, self.saved_stats = cfg.ln_eps, cfg.layernorm_vjp
    self.scale = nnx.Param(jnp.ones((cfg.embed_dim,)), out_sharding=('embed',))
    self.bias = _param(rngs, (cfg.embed_dim,), ('embed',))

  def __call__(self, x_BLD):
    if self.saved_stats:
      return layer_norm_saved_stats(x_BLD, self.scale[...], self.bias[...], self.eps)
    return _layer_norm(x_BLD, self.scale[...], self.bias[...], self.eps)[0]


class Attention(nnx.Module):

  def __init__(self, cfg: GPTConfig, rngs):
    self.cfg = cfg
    D, H, K = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    self.c_attn_kernel = _param(rngs, (D, 3, H, K), ('embed', None, 'heads', 'kv'), 0.02)
    self.c_attn_bias = _param(rngs, (3, H, K), (None, 'heads', 'kv'))
    # GPT-2 scales residual projections by 1/sqrt(2 * layers) at init.
    std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.c_proj_kernel = _param(rngs, (H, K, D), ('heads', 'kv', 'embed'), std)
    self.c_proj_bias = _param(rngs, (D,), ('embed',))

  def project(self, x_BLD):
    """Queries, keys and values [batch, length, heads, head_dim]: three matmuls, not one
    [D, 3HK] whose output is then split, so that the gradients of attention's slices of q, k
    and v (causal_blocks) are padded into and summed over one [B, L, H, K] each instead of the
    whole [3, B, L, H, K] (CPU: 2.4% faster step at the demo size, 1.1% at gpt2)."""
    dt = x_BLD.dtype
    kernel, bias = self.c_attn_kernel[...].astype(dt), self.c_attn_bias[...].astype(dt)
    return [jnp.einsum('bld,dhk->blhk', x_BLD, kernel[:, t]) + bias[t] for t in range(3)]

  def attend(self, q_BLHK, k_BMHK, v_BMHK, mask_B1LM, key):
    """Attention of L queries over M keys (M = L in training, the KV cache when decoding)."""
    how, c = self.cfg.attention, self.cfg.attention_block
    L, M = q_BLHK.shape[1], k_BMHK.shape[1]
    if how == 'dot_product':  # cuDNN flash attention on GPU in bf16/fp16, XLA's elsewhere.
      out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BMHK, v_BMHK, mask=mask_B1LM,
                                              is_causal=L == M,
                                              implementation='cudnn' if self.cfg.flash else None)
    elif how == 'causal_blocks' and L == M and L > c:
      # Query block [s, s + c) only sees keys [0, s + c): the masked-out upper triangle of blocks
      # is never computed (L = 4c does 10/16 of the work). The last block is shorter where c
      # does not divide L (slices stop at L).
      starts = range(0, L, c)
      keys = jax.random.split(key, len(starts)) if key is not None else [None] * len(starts)
      out_BLHK = jnp.concatenate([self.softmax_attention(
          q_BLHK[:, s:s + c], k_BMHK[:, :s + c], v_BMHK[:, :s + c],
          mask_B1LM[:, :, s:s + c, :s + c], key_s) for s, key_s in zip(starts, keys)], 1)
    else:
      out_BLHK = self.softmax_attention(q_BLHK, k_BMHK, v_BMHK, mask_B1LM, key)
    dt = q_BLHK.dtype
    return jnp.einsum('blhk,hkd->bld', out_BLHK, self.c_proj_kernel[...].astype(dt)) + \
        self.c_proj_bias[...].astype(dt)

  def softmax_attention(self, q_BLHK, k_BMHK, v_BMHK, mask_B1LM, key):
    """softmax(q k^T / sqrt(head_dim)) v with fp32 scores, masked, dropout on the probabilities."""
    dt = q_BLHK.dtype
    scores_BHLM = jnp.einsum('blhk,bmhk->bhlm', q_BLHK, k_BMHK).astype(jnp.float32)
    scores_BHLM = jnp.where(mask_B1LM, scores_BHLM / math.sqrt(self.cfg.head_dim), -1e30)
    probs_BHLM = jax.nn.softmax(scores_BHLM, axis=-1).astype(dt)
    probs_BHLM = _dropout(probs_BHLM, self.cfg.dropout, key)
    return jnp.einsum('bhlm,bmhk->blhk', probs_BHLM, v_BMHK)

  def __call__(self, x_BLD, mask_B1LL, key):
    return self.attend(*self.project(x_BLD), mask_B1LL, key)


@jax.checkpoint
def _bias_gelu(x_BLF, bias_F):
  """GPT-2's tanh GELU of x + bias, recomputed in backward from the c_fc matmul's output, which
  exists anyway. Autodiff would keep two more [batch, length, mlp] activations for backward
  (x + bias, or tanh's output), each written in forward and read in backward (XLA's H100 plan of
  gpt2 B=16: 2.4 GB of traffic and 1.1 GiB of step memory)."""
  return jax.nn.gelu(x_BLF + bias_F, approximate=True)


class MLP(nnx.Module):

  def __init__(self, cfg: GPTConfig, rngs):
    D, F = cfg.embed_dim, cfg.mlp_dim
    self.c_fc_kernel = _param(rngs, (D, F), ('embed', 'mlp'), 0.02)
    self.c_fc_bias = _param(rngs, (F,), ('mlp',))
    self.c_proj_kernel = _param(rngs, (F, D), ('mlp', 'embed'), 0.02 / math.sqrt(2 * cfg.num_layers))
    self.c_proj_bias = _param(rngs, (D,), ('embed',))

  def __call__(self, x_BLD):
    dt = x_BLD.dtype
    h_BLF = _bias_gelu(x_BLD @ self.c_fc_kernel[...].astype(dt), self.c_fc_bias[...].astype(dt))
    return h_BLF @ self.c_proj_kernel[...].astype(dt) + self.c_proj_bias[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg: GPTConfig, rngs):
    self.dropout = cfg.dropout
    self.ln_1 = LayerNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.ln_2 = LayerNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BLD, mask_B1LL, key):
    keys = jax.random.split(key, 3) if key is not None else (None,) * 3
    x_BLD = x_BLD + _dropout(self.attn(self.ln_1(x_BLD), mask_B1LL, keys[0]), self.dropout, keys[1])
    return x_BLD + _dropout(self.mlp(self.ln_2(x_BLD)), self.dropout, keys[2])


class GPT(nnx.Module):
  """GPT-2: learned positions, pre-LayerNorm blocks, tanh GELU, LM head tied to wte, and with
  cfg.num_labels a bias-free classification head `score` [embed, labels] (HF's score.weight.T)."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = _param(rngs, (cfg.vocab_size, cfg.embed_dim), ('vocab', 'embed'), 0.02)
    self.wpe = _param(rngs, (cfg.max_len, cfg.embed_dim), (None, 'embed'), 0.01)
    self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = LayerNorm(cfg, rngs)
    if cfg.num_labels:
      self.score = _param(rngs, (cfg.embed_dim, cfg.num_labels), ('embed', None), 0.02)  # HEAD

  def hidden(self, tokens_BL, positions_BL=None, segment_ids_BL=None, dropout_key=None):
    """Final hidden states [batch, length, embed] after ln_f.

    positions default to 0..L-1; segment_ids (packed sequences) keep attention inside a segment.
    dropout_key=None means deterministic (eval); a key turns dropout on.
    """
    B, L = tokens_BL.shape
    if L > self.cfg.max_len:
      raise ValueError(f'sequence length {L} > model max_len {self.cfg.max_len}')
    dt = jnp.dtype(self.cfg.dtype)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
    mask_B1LL = jnp.tril(jnp.ones((L, L), bool))[None, None]
    if segment_ids_BL is not None:
      same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
      mask_B1LL = mask_B1LL & same_BLL[:, None]
    keys = (jax.random.split(dropout_key, self.cfg.num_layers + 1)
            if dropout_key is not None and self.cfg.dropout > 0 else [None] * (self.cfg.num_layers + 1))
    x_BLD = self.wte[...][tokens_BL] + self.wpe[...][positions_BL]
    x_BLD = _dropout(x_BLD.astype(dt), self.cfg.dropout, keys[-1])
    call = lambda block, x_BLD, key: block(x_BLD, mask_B1LL, key)
    if self.cfg.remat != 'none':  # Keep what the policy saves; recompute the rest in backward.
      call = nnx.remat(call, policy=getattr(jax.checkpoint_policies, self.cfg.remat))
    if self.cfg.scan_layers:
      # The layer params stacked [layers, ...] (a copy per step) and one block traced: compile
      # time no longer grows with depth. Parameters keep their per-layer layout everywhere else.
      graphdef = nnx.graphdef(self.h[0])
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in self.h])
      step_keys = (jnp.stack(keys[:-1]) if keys[-1] is not None
                   else jnp.zeros((self.cfg.num_layers,), jnp.uint32))

      def body(x_BLD, layer):
        state, key = layer
        return call(nnx.merge(graphdef, state), x_BLD,
                    key if keys[-1] is not None else None), None
      x_BLD, _ = jax.lax.scan(body, x_BLD, (stacked, step_keys))
    else:
      for block, key in zip(self.h, keys):
        x_BLD = call(block, x_BLD, key)
        if self.cfg.grad_barrier:  # (A scan's carry is written once per layer anyway.)
          x_BLD = grad_barrier(x_BLD)
    return self.ln_f(x_BLD)

  def init_cache(self, batch, slots):
    """An empty KV cache: per layer (keys, values) [batch, slots, heads, head_dim]."""
    shape = (batch, slots, self.cfg.num_heads, self.cfg.head_dim)
    return [(jnp.zeros(shape, self.cfg.dtype), jnp.zeros(shape, self.cfg.dtype))
            for _ in range(self.cfg.num_layers)]

  def extend(self, tokens_BL, start_B, cache):
    """Decoding: run tokens at positions start_B + 0..L-1 of each row against the KV cache,
    writing their keys and values into those slots (prefill: the prompts at start 0; then one
    token per step). Returns (hidden [batch, L, embed], cache). No dropout."""
    B, L = tokens_BL.shape
    positions_BL = start_B[:, None] + jnp.arange(L)
    slots = cache[0][0].shape[1]
    if slots > self.cfg.max_len:
      raise ValueError(f'{slots} cache slots > model max_len {self.cfg.max_len}')
    mask_B1LM = (jnp.arange(slots) <= positions_BL[:, :, None])[:, None]
    rows_B1 = jnp.arange(B)[:, None]
    x_BLD = (self.wte[...][tokens_BL] + self.wpe[...][positions_BL]).astype(self.cfg.dtype)
    new_cache = []
    for block, (k_BMHK, v_BMHK) in zip(self.h, cache):
      q_BLHK, k_BLHK, v_BLHK = block.attn.project(block.ln_1(x_BLD))
      k_BMHK = k_BMHK.at[rows_B1, positions_BL].set(k_BLHK)
      v_BMHK = v_BMHK.at[rows_B1, positions_BL].set(v_BLHK)
      x_BLD = x_BLD + block.attn.attend(q_BLHK, k_BMHK, v_BMHK, mask_B1LM, None)
      x_BLD = x_BLD + block.mlp(block.ln_2(x_BLD))
      new_cache.append((k_BMHK, v_BMHK))
    return self.ln_f(x_BLD), new_cache

  def logits(self, hidden_BLD, dtype=jnp.float32):
    """Tied LM head, logits [..., vocab] ([batch, length] or [tokens] before), float32 unless
    `dtype` says otherwise; padding ids (>= tokenizer_vocab) get -1e9 added, so the padded vocab
    changes no probability (and HF exports can drop those rows). An added constant, not a
    select: its gradient is the identity, so the backward pass makes no masked copy of the
    [tokens, vocab] logit gradient."""
    logits_BLV = head_matmul(hidden_BLD, self.wte[...].astype(hidden_BLD.dtype), dtype)
    if 0 < self.cfg.tokenizer_vocab < self.cfg.vocab_size:
      padding_V = jnp.arange(self.cfg.vocab_size) >= self.cfg.tokenizer_vocab
      logits_BLV += jnp.where(padding_V, -1e9, 0.).astype(dtype)
    return logits_BLV

  def token_losses(self, hidden_BLD, targets_BL):
    """Next-token cross-entropy [batch, length] from the final hidden states. With cfg.loss_chunk
    the [tokens, vocab] logits exist loss_chunk tokens at a time and are recomputed in the
    backward pass, so full float32 logits (B*L*V*4 bytes) are never held."""
    dtype = hidden_BLD.dtype if self.cfg.logits_dtype == 'compute' else jnp.float32
    ce = lambda h_NxD, t_N: cross_entropy(self.logits(h_NxD, dtype).astype(jnp.float32), t_N,
                                          self.cfg.logsumexp == 'one_pass')
    n = self.cfg.loss_chunk
    B, L, D = hidden_BLD.shape
    if not n or n >= B * L:
      return ce(hidden_BLD, targets_BL)
    pad = -(B * L) % n
    h_CND = jnp.pad(hidden_BLD.reshape(B * L, D), ((0, pad), (0, 0))).reshape(-1, n, D)
    t_CN = jnp.pad(targets_BL.reshape(B * L), (0, pad)).reshape(-1, n)
    ce_CN = jax.lax.map(lambda ht: jax.checkpoint(ce)(*ht), (h_CND, t_CN))
    return ce_CN.reshape(-1)[:B * L].reshape(B, L)

  def classify(self, hidden_BLD, last_B):
    """Float32 class logits [batch, labels] from the hidden state at index last_B of each row."""
    h_BD = jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0]
    return jnp.einsum('bd,dc->bc', h_BD, self.score[...].astype(h_BD.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_BL, **kwargs):
    return self.logits(self.hidden(tokens_BL, **kwargs))
