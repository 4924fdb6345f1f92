import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import small_config
from jaxft import model as model_lib, sharding

# Parameter counts of the HF GPT-2 checkpoints (embeddings tied, vocab 50257).
HF_PARAM_COUNTS = {'gpt2': 124_439_808, 'gpt2-medium': 354_823_168,
                   'gpt2-large': 774_030_080, 'gpt2-xl': 1_557_611_200}


def make(cfg_overrides=None, seed=0):
  cfg = small_config(**(cfg_overrides or {}))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with sharding.activate(mesh):
    # Initialised in one compiled program: eagerly, every random draw compiles its own.
    return nnx.jit(lambda: model_lib.GPT(model_lib.config_from(cfg.model, 258), nnx.Rngs(seed)))()


@pytest.mark.parametrize('size', HF_PARAM_COUNTS)
def test_named_sizes_match_hf_parameter_counts(size):
  cfg = small_config(model__size=size, model__vocab_size=50257)
  for k in ('num_layers', 'num_heads', 'embed_dim', 'max_len'):
    cfg.model[k] = None
  gcfg = model_lib.config_from(cfg.model, 50257)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with sharding.activate(mesh):
    abstract = nnx.eval_shape(lambda: model_lib.GPT(gcfg, nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == HF_PARAM_COUNTS[size]


def test_vocab_is_padded_to_multiple():
  cfg = small_config()
  assert model_lib.config_from(cfg.model, 258).vocab_size == 384
  assert model_lib.config_from(cfg.model, 50257).vocab_size == 50304


def test_padded_vocab_ids_get_no_probability_and_no_gradient():
  """Vocab 384 for a 258-id tokenizer: the 126 padding ids get probability 0, their wte rows no
  gradient, and the loss is that of the same weights without the padding rows."""
  m = make()
  assert (m.cfg.vocab_size, m.cfg.tokenizer_vocab) == (384, 258)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 16)))
  probs = nnx.jit(lambda m: jax.nn.softmax(m(tokens), -1))(m)
  assert float(probs[..., 258:].max()) == 0.0

  @nnx.jit(static_argnums=1)
  def loss(model, cut=384):
    logits = model(tokens[:, :-1])[..., :cut]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  grad = nnx.jit(nnx.grad(loss))(m).wte[...]
  assert float(jnp.abs(grad[258:]).max()) == 0.0 and float(jnp.abs(grad[:258]).max()) > 0
  np.testing.assert_allclose(loss(m), loss(m, 258), rtol=1e-6)


def test_lm_head_backward_matmuls_run_in_the_compute_dtype():
  """The logits are float32 (model.head_matmul), but under bf16 compute the two backward matmuls
  take the logit gradient in bf16: autodiff of the float32-output einsum hands them the float32
  [tokens, vocab] cotangent (in XLA's H100 plan of gpt2 both were f32 x f32 dots). In float32
  the gradients are autodiff's exactly; in bf16 they are within bf16 rounding of it."""
  def vocab_dot_inputs(fn, *args):  # dtypes of [.., vocab] operands of the dots in grad(fn)
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(args)))))(*args)
    return {str(v.aval.dtype) for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general'
            for v in e.invars if v.aval.shape[-1] == 384}

  m = make({'model__dtype': 'bfloat16'})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 16)))
  graphdef, state = nnx.split(m)

  def model_loss(state):
    model = nnx.merge(graphdef, state)
    return model.token_losses(model.hidden(tokens[:, :-1]), tokens[:, 1:]).mean()
  assert vocab_dot_inputs(model_loss, state) == {'bfloat16'}

  autodiff = lambda h, w: jnp.einsum('...d,vd->...v', h, w, preferred_element_type=jnp.float32)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h, w = jax.random.normal(k1, (2, 16, 64)), 0.1 * jax.random.normal(k2, (384, 64))
  labels = jax.random.randint(k3, (2, 16), 0, 384)
  for dtype in (jnp.bfloat16, jnp.float32):
    def loss(head):
      return lambda h, w: optax.softmax_cross_entropy_with_integer_labels(
          head(h.astype(dtype), w.astype(dtype)), labels).mean()
    ours, ref = (jax.grad(loss(f), (0, 1))(h, w) for f in (model_lib.head_matmul, autodiff))
    if dtype == jnp.float32:
      for g, r in zip(ours, ref):
        np.testing.assert_array_equal(g, r)
    else:
      assert vocab_dot_inputs(loss(autodiff), h, w) == {'float32'}  # What is avoided.
      assert vocab_dot_inputs(loss(model_lib.head_matmul), h, w) == {'bfloat16'}
      for g, r in zip(ours, ref):
        np.testing.assert_allclose(g, r, atol=1e-2 * float(jnp.abs(r).max()))


def test_cross_entropy_is_optaxs_without_a_scatter_in_its_backward():
  """model.cross_entropy: the losses of optax.softmax_cross_entropy_with_integer_labels bit for
  bit (large logits too), gradients within float32 rounding, and no scatter into the [tokens,
  vocab] gradient (optax's gather has one; it kept XLA from fusing the softmax gradient with its
  bf16 cast, one more float32 pass over the logits in XLA's H100 plan)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  logits = 30 * jax.random.normal(k1, (64, 384))
  targets = jax.random.randint(k2, (64,), 0, 384)
  np.testing.assert_array_equal(model_lib.cross_entropy(logits, targets),
                                optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  ours, theirs = (jax.grad(lambda x: fn(x, targets).sum())(logits) for fn in (
      model_lib.cross_entropy, optax.softmax_cross_entropy_with_integer_labels))
  np.testing.assert_allclose(ours, theirs, atol=1e-6)

  scatters = lambda fn: 'scatter' in jax.jit(jax.grad(lambda x: fn(x, targets).sum())).lower(
      logits).as_text()
  assert scatters(optax.softmax_cross_entropy_with_integer_labels)
  assert not scatters(model_lib.cross_entropy)


def test_one_pass_logsumexp_reads_the_logits_once_in_xlas_h100_plan():
  """model.one_pass_logsumexp: jax.nn.logsumexp's values and softmax gradient within float32
  rounding (large logits, -inf and the -1e9 of padding ids too), and in the plan XLA's GPU
  compiler makes for an H100 (the `aot` extra) one fusion reads the [tokens, vocab] logits where
  jax.nn.logsumexp's max-then-sum takes two."""
  from jaxft import bench
  k1, k2 = jax.random.split(jax.random.key(0))
  for scale in (1., 30., 300.):
    x = scale * jax.random.normal(k1, (64, 384))
    x = x.at[0, 5:].set(-jnp.inf).at[1, 200:].set(-1e9)
    np.testing.assert_allclose(model_lib.one_pass_logsumexp(x), jax.nn.logsumexp(x, -1),
                               rtol=2e-7, atol=0)
    ours, ref = (jax.grad(lambda x: (fn(x) * jnp.arange(64)).sum())(x) for fn in (
        model_lib.one_pass_logsumexp, lambda x: jax.nn.logsumexp(x, -1)))
    np.testing.assert_allclose(ours, ref, atol=3e-7 * scale * 64)
  targets = jax.random.randint(k2, (64,), 0, 384)
  np.testing.assert_allclose(model_lib.cross_entropy(x, targets, one_pass=True),
                             optax.softmax_cross_entropy_with_integer_labels(x, targets), rtol=1e-6)

  devices, _ = bench.target_devices('h100')
  logits = jax.ShapeDtypeStruct((4096, 50304), jnp.float32,
                                sharding=jax.sharding.SingleDeviceSharding(devices[0]))
  def readers(lse):  # The fusions of the compiled plan that take the logits as an operand.
    hlo = jax.jit(lambda x: lse(x).sum()).lower(logits).compile().as_text()
    entry = hlo[hlo.index('\nENTRY'):]
    param = re.search(r'%(\S+) = f32\[4096,50304\]\S* parameter\(0\)', entry).group(1)
    return len(re.findall(rf'fusion\([^)]*%{re.escape(param)}[,)]', entry))
  assert readers(lambda x: jax.nn.logsumexp(x, -1)) == 2
  assert readers(model_lib.one_pass_logsumexp) == 1


def test_gelu_is_recomputed_in_backward_with_autodiffs_gradients():
  """model._bias_gelu keeps only its input (the c_fc matmul's output) for backward, not x + bias
  or tanh's output as well: of the MLP's [batch, length, mlp] residuals only that input and the
  GELU's output (the c_proj gradient needs it) stay. The gradients are plain autodiff's, bit for
  bit, in float32 and bfloat16."""
  F = 96
  k = jax.random.split(jax.random.key(0), 4)
  args = (jax.random.normal(k[0], (2, 8, 32)), 0.2 * jax.random.normal(k[1], (32, F)),
          jax.random.normal(k[2], (F,)), 0.2 * jax.random.normal(k[3], (F, 32)))
  plain = lambda h, b: jax.nn.gelu(h + b, approximate=True)

  def mlp(act, dtype):
    return lambda x, w1, b, w2: (act(x.astype(dtype) @ w1.astype(dtype), b.astype(dtype)) @
                                 w2.astype(dtype)).astype(jnp.float32)
  saved = lambda act: sum(l.ndim == 3 and l.shape[-1] == F
                          for l in jax.tree.leaves(jax.vjp(mlp(act, jnp.float32), *args)[1]))
  assert saved(model_lib._bias_gelu) == 2 and saved(plain) > 2
  for dtype in (jnp.float32, jnp.bfloat16):
    ours, ref = (jax.jit(jax.grad(lambda *a: mlp(act, dtype)(*a).sum(), (0, 1, 2, 3)))(*args)
                 for act in (model_lib._bias_gelu, plain))
    for g, r in zip(ours, ref):
      np.testing.assert_array_equal(g, r)


def test_causal_no_future_leak():
  m = make()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
  changed = tokens.at[:, 10:].set(7)
  a, b = m(tokens), m(changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert not np.allclose(a[:, 10:], b[:, 10:])


def test_segments_attend_only_within_themselves():
  """Two documents packed in one row with restarted positions = each document alone."""
  m = make()
  rng = np.random.default_rng(1)
  doc1, doc2 = rng.integers(0, 256, (1, 6)), rng.integers(0, 256, (1, 10))
  packed = jnp.asarray(np.concatenate([doc1, doc2], 1))
  positions = jnp.asarray(np.concatenate([np.arange(6), np.arange(10)])[None])
  segments = jnp.asarray(np.array([[0] * 6 + [1] * 10]))
  out = m(packed, positions_BL=positions, segment_ids_BL=segments)
  np.testing.assert_allclose(out[:, :6], m(jnp.asarray(doc1)), atol=1e-5)
  np.testing.assert_allclose(out[:, 6:], m(jnp.asarray(doc2)), atol=1e-5)


def test_dropout_is_keyed_and_off_by_default():
  m = make({'model__dropout': 0.5})
  tokens = jnp.ones((2, 8), jnp.int32)
  np.testing.assert_array_equal(m(tokens), m(tokens))  # No key: deterministic (eval).
  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(m(tokens, dropout_key=k1), m(tokens, dropout_key=k1))
  assert not np.allclose(m(tokens, dropout_key=k1), m(tokens, dropout_key=k2))
  assert not np.allclose(m(tokens, dropout_key=k1), m(tokens))


@pytest.mark.parametrize('switches', [{'model__attention': 'einsum'},
                                      {'model__attention': 'dot_product'},
                                      {'model__attention': 'causal_blocks',
                                       'model__scan_layers': True}])
def test_kv_cache_extend_equals_the_full_forward(switches):
  """Decoding's prefill of right-padded prompts (lengths 8 and 5), then one token a step at each
  row's own position, gives the full forward's hidden states, with each attention (the GPU picks
  einsum or dot_product; tests/test_generate.py decodes with the CPU's causal_blocks only)."""
  m = make(switches)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))
  full = m.hidden(tokens)
  lengths = jnp.array([8, 5])
  prompts = jnp.where(jnp.arange(8) < lengths[:, None], tokens[:, :8], 257)  # 257: PAD.
  hidden, cache = m.extend(prompts, jnp.zeros(2, jnp.int32), m.init_cache(2, 16))
  np.testing.assert_allclose(hidden[0], full[0, :8], atol=1e-5)
  np.testing.assert_allclose(hidden[1, :5], full[1, :5], atol=1e-5)
  for i in range(4):
    at = lengths + i
    hidden, cache = m.extend(tokens[jnp.arange(2), at][:, None], at, cache)
    np.testing.assert_allclose(hidden[:, 0], full[jnp.arange(2), at], atol=1e-5)


def test_too_long_sequence_is_an_error():
  with pytest.raises(ValueError, match='sequence length 65 > model max_len 64'):
    make()(jnp.ones((1, 65), jnp.int32))


def test_bad_sizes_are_errors():
  with pytest.raises(ValueError, match="unknown model.size 'gpt5'"):
    make({'model__size': 'gpt5'})
  with pytest.raises(ValueError, match='not divisible by model.num_heads=5'):
    make({'model__num_heads': 5})
