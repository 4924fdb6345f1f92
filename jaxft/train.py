"""The one trainer.

    python -m jaxft.train --config=configs/demo.py [--config.key=value ...] [--workdir=DIR]

Rerunning the same command resumes from the newest checkpoint in the workdir.
"""
import contextlib
import ctypes
import json
import math
import os
import platform
import re
import signal
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jaxft import checkpoint, config as config_lib, data, evaluate, model as model_lib, \
    objectives, optim, sharding, tokenizer as tokenizer_lib


def build_state(cfg, model_cfg, tx, mesh):
  """(graphdef, abstract state, shardings, init fn). Nothing is allocated until init_fn runs;
  like a jitted function, init_fn.lower() gives its program lowered, to compile or plan."""
  def init(seed_key):
    params = nnx.state(model_lib.GPT(model_cfg, nnx.Rngs(params=seed_key)), nnx.Param)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32),
            'rng': jax.random.key_data(jax.random.fold_in(seed_key, 1))}

  with sharding.activate(mesh):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.GPT(model_cfg, nnx.Rngs(0))))
    abstract = jax.eval_shape(lambda: init(jax.random.key(0)))  # Traced: no device runs it.
  shardings = sharding.state_shardings(abstract, mesh)
  if cfg.optim.offload:  # Between steps the optimizer state lives in host memory.
    shardings['opt_state'] = jax.tree.map(lambda s: s.with_memory_kind('pinned_host'),
                                          shardings['opt_state'])

  init_step = jax.jit(init, out_shardings=shardings)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def init_fn(compiled=None):
    """The initial state; `compiled`: init_fn.lower().compile() (jaxft.bench times that)."""
    with sharding.activate(mesh):
      return (compiled or init_step)(jax.random.key(cfg.seed))

  def lower_init():  # For `mesh`'s devices, a compile-only target's too; nothing runs.
    key = jax.eval_shape(lambda: jax.random.key(0))
    with sharding.activate(mesh):
      return init_step.lower(jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated))
  init_fn.lower = lower_init
  return graphdef, abstract, shardings, init_fn


def make_train_step(graphdef, objective, tx, lr_schedule, grad_accum, trainable=None,
                    opt_shardings=None):
  """The one jitted, state-donating train_step(state, batch) -> (state, metrics).

  The batch is split into `grad_accum` micro-batches whose loss sums and supervised-token counts
  are added up before dividing, so k micro-batches give exactly the update of one k-times batch
  (without dropout: micro-batch i draws its masks from fold_in(key, i), so they depend on k).
  Params for which trainable(path) is False are frozen: no gradient flows into them and they
  are carried over untouched (bit for bit). `opt_shardings`: the optimizer state's shardings;
  if they are in host memory (build_state with optim.offload), the state is brought to the device
  for the update and sent back after it.
  """
  frozen = lambda path: trainable is not None and not trainable(path)
  offloaded = opt_shardings if opt_shardings is not None and any(
      s.memory_kind == 'pinned_host' for s in jax.tree.leaves(opt_shardings)) else None

  def loss_sum(params, batch, key):
    params = model_lib.map_with_path(
        lambda path, x: jax.lax.stop_gradient(x) if frozen(path) else x, params)
    return objective.loss(nnx.merge(graphdef, params), batch, key)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def train_step(state, batch):
    params = state['params']
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    # Strided micro-batches ([B] -> [k, B/k]) keep each device's rows on that device.
    micro = jax.tree.map(
        lambda x: x.reshape((-1, grad_accum) + x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, inputs):
      mb, i = inputs
      (s, c), g = grad_fn(params, mb, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (s, c, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    (loss_sum_, count, grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
    denom = jnp.maximum(count, 1.0)  # An empty mask is reported by the loop, not divided by.
    grads = jax.tree.map(lambda g: g / denom, grads)
    opt_state = state['opt_state']
    if offloaded is not None:
      opt_state = jax.device_put(opt_state, jax.tree.map(
          lambda s: s.with_memory_kind('device'), offloaded))
    lr = lr_schedule(optim.schedule_count(opt_state))  # What this update applies.
    updates, opt_state = tx.update(grads, opt_state, params)
    if offloaded is not None:
      opt_state = jax.device_put(opt_state, offloaded)
    new_params = model_lib.map_with_path(lambda path, old, new: old if frozen(path) else new,
                                         params, optax.apply_updates(params, updates))
    new_state = {'params': new_params, 'opt_state': opt_state,
                 'step': state['step'] + 1, 'rng': state['rng']}
    metrics = {'loss': loss_sum_ / denom, 'grad_norm': optax.tree.norm(grads),
               'lr': lr, 'supervised_tokens': count,
               'tokens': jnp.sum(batch['segment_ids'] > 0).astype(jnp.float32),
               # optax.apply_if_finite's count: the update was dropped iff 0 < it <= skip_nonfinite.
               'nonfinite_in_a_row': optax.tree.get(opt_state, 'notfinite_count')}
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def summary_writer(logdir, **kwargs):
  """tensorboardX's SummaryWriter (it writes gs:// too), imported without torch: tensorboardX
  imports torch whenever it is installed (the hf extra), only to accept torch tensors, and that
  added ~4 s to every run's start."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError.
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter(logdir, **kwargs)


class MetricsLog:
  """metrics.jsonl + TensorBoard (process 0 only); on resume, drops lines past the restored step."""

  def __init__(self, workdir, resume_step, evaluated_again=False):
    """`evaluated_again`: the run evaluates at resume_step once more (only its final evaluation
    was left to do), so the val/test lines logged there before are dropped too."""
    self.workdir, self.path = workdir, epath.Path(workdir) / 'metrics.jsonl'
    self.enabled = jax.process_index() == 0
    self.appendable = '://' not in str(workdir)  # Object stores (gs://) cannot append.
    self.tb, self.lines = None, []
    if not self.enabled:
      return
    if self.path.exists():
      lines = [l for l in self.path.read_text().splitlines() if l.strip()]
      try:
        if lines:
          json.loads(lines[-1])
      except json.JSONDecodeError:  # Cut short by a kill or a full disk: dropped.
        log(f'{self.path}: dropping its unfinished last line {lines.pop()[:80]!r}')
      keep = lambda l: l['step'] < resume_step or l['step'] == resume_step and (
          l['split'] == 'train' or not evaluated_again)
      self.lines = [l + '\n' for l in lines if keep(json.loads(l))]
      config_lib.write_file(workdir, 'metrics.jsonl', ''.join(self.lines))
    # TensorBoard drops what the earlier event files hold from purge_step on: past the restored
    # step, or from it when its val/test lines are logged again (its train lines written anew).
    self.tb = summary_writer(str(epath.Path(workdir) / 'tb'),
                             purge_step=resume_step + (not evaluated_again))
    for line in map(json.loads, self.lines if evaluated_again else []):
      if line['step'] == resume_step:
        self.scalars(line.pop('step'), line.pop('split'), line)

  def write(self, step, split, values):
    if not self.enabled:
      return
    # A NaN/Inf is written as null: the file stays JSON that any reader accepts.
    line = {'step': step, 'split': split, **{k: v if not isinstance(v, float) or np.isfinite(v)
                                             else None for k, v in values.items()}}
    self.lines.append(json.dumps(line) + '\n')
    if self.appendable:
      with self.path.open('a') as f:
        f.write(self.lines[-1])
    else:  # Rewritten whole: every log_every steps, one object.
      config_lib.write_file(self.workdir, 'metrics.jsonl', ''.join(self.lines))
    self.scalars(step, split, values)
    self.tb.flush()

  def scalars(self, step, split, values):
    for k, v in values.items():
      if isinstance(v, (int, float)):
        self.tb.add_scalar(f'{split}/{k}', v, step)

  def close(self):
    if self.tb:
      self.tb.close()


class Progress:
  """tqdm bar on a terminal; plain log lines (every log_every steps) otherwise; process 0 only."""

  def __init__(self, start, total):
    self.enabled = jax.process_index() == 0
    self.total, self.tty = total, self.enabled and sys.stderr.isatty()
    self.t0, self.start = time.time(), start
    if self.tty:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step, line):
    if not self.enabled:
      return
    if self.tty:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix_str(f"loss {line['loss']:.4f} {line['tokens_per_s']:,.0f} tok/s")
      return
    done = step - self.start
    eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
    print(f"step {step}/{self.total} loss {line['loss']:.4f} lr {line['lr']:.2e} "
          f"grad_norm {line['grad_norm']:.3f} {line['tokens_per_s']:,.0f} tok/s "
          f"eta {eta:.0f}s", flush=True)

  def close(self):
    if self.tty:
      self.bar.close()


class Preemption:
  """preempted(step): stop at this step? SIGTERM (preemption, scancel, some launchers' Ctrl-C)
  asks for a checkpoint at the next step and a clean exit; alone, so does a first Ctrl-C (a
  second one stops at once, without saving). With several processes they must all stop at the
  same step, so JAX's preemption sync (which hears the notice, SIGTERM by default, on any
  process) decides, and Ctrl-C interrupts as usual."""

  def __init__(self):
    self.shared = jax.process_count() > 1
    self.what = 'preemption notice' if self.shared else None  # Which notice came first.
    self.ctrl_c = False
    if not self.shared:
      self.previous = {s: signal.signal(s, self.notice) for s in (signal.SIGTERM, signal.SIGINT)}

  def notice(self, signum, frame):
    if signum == signal.SIGINT:
      if self.ctrl_c:
        raise KeyboardInterrupt
      self.ctrl_c = True
      log('Ctrl-C: saving a checkpoint at the next step, then exiting (Ctrl-C again: stop now, '
          'unsaved)')
    self.what = self.what or ('Ctrl-C' if signum == signal.SIGINT else 'SIGTERM')

  def __call__(self, step):
    if self.shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.what is not None

  def __enter__(self):
    return self

  def __exit__(self, *exc):  # After the last checkpoint wait: a second SIGTERM must not cut it.
    if not self.shared:
      for s, handler in self.previous.items():
        signal.signal(s, handler)


def summary(metrics):
  """'loss 1.2345 accuracy 0.9000 ...' for the scalar metrics."""
  return ' '.join(f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float))


def log(msg):
  if jax.process_index() == 0:
    print(msg, flush=True)


def prepare_splits(cfg, objective, tok):
  """(checked records, encoded val/test examples) per split, with a log line each, and the bad
  records skipped (data.on_error='skip') as lines for <workdir>/skipped_records.txt. The train
  records are tokenized later, as the TrainStream draws them."""
  records, examples, skipped = {}, {}, []
  for split, recs in data.load_splits(cfg.data).items():
    # A dataset's train split is read as drawn too: each process reads only its records.
    lazy = split == 'train' and recs.lazy
    good = records[split] = recs if lazy else objective.check(recs, cfg.data)
    bad = recs.skipped + ([] if lazy else good.skipped)
    if split == 'train':
      rows = data.process_rows(cfg.train.batch_size)
      line = (f'{len(good)} records, {"read, checked and " if lazy else ""}tokenized as drawn '
              f'(this process: rows {rows.start}..{rows.stop - 1} of each batch of '
              f'{cfg.train.batch_size})')
    else:
      ex = examples[split] = objective.encode(good, tok, cfg.data)
      objectives.audit(ex, split)
      bad += ex.skipped
      line = (f'{len(good)} records -> {len(ex["tokens"])} rows, '
              f'{int((ex["segment_ids"] > 0).sum()):,} tokens, '
              f'{int(ex["loss_mask"].sum()):,} supervised'
              + (f', {ex.dropped} dropped without supervised tokens' if ex.dropped else ''))
    skipped += [f'{split}\t{message}' for message in bad]
    log(f'{split} ({cfg.objective}): {line}'
        + (f', {len(bad)} bad records skipped (first: {bad[0]})' if bad else ''))
  return records, examples, skipped


def trainable_fn(cfg, objective):
  """train.trainable as a predicate on param paths, or None when everything trains."""
  if cfg.train.trainable == 'all':
    return None
  if cfg.train.trainable == 'head' and not objective.has_head:
    raise config_lib.ConfigError(f"train.trainable='head' needs a head, and {cfg.objective} has "
                                 f"none (its output layer is the tied wte); use a regex")
  try:
    return optim.trainable_fn(cfg.train.trainable)
  except re.error as e:
    raise config_lib.ConfigError(f'train.trainable={cfg.train.trainable!r} is not a regex: {e}')


def placeholder_free(names):
  """Class names as given, or None if they are only placeholders (HF's LABEL_i, jaxft's i)."""
  if not names or all(n in (str(i), f'LABEL_{i}') for i, n in enumerate(names)):
    return None
  return list(names)


def check_source(source, model_cfg, label_names, tok):
  """Refuse an init_from source that differs from the run where the shapes do not show it: the
  tokenizer (two of one padded vocab size would load each other's embeddings as other tokens),
  the LayerNorm epsilon (of a jaxft source; convert.check_config compares an HF one's), an HF
  source's end-of-text and classifier pad ids, and, where both name them, the classes its head
  was trained for, which would otherwise load as the wrong labels without a word."""
  if source.startswith('hf:'):
    from jaxft import convert  # Needs the `hf` extra (safetensors).
    hf_dir = convert.local_dir(source[3:])
    c, theirs = convert.read_hf_config(hf_dir)
    eps, their_tok = model_cfg.ln_eps, f'hf:{hf_dir}'  # (No tokenizer files: FileNotFoundError.)
    problems, theirs_encoding = convert.token_id_problems(c, theirs, tok), None
  else:
    try:
      src, directory, step = checkpoint.run_config(source)
    except FileNotFoundError:  # A checkpoint without its run's config.json: nothing to compare.
      return
    theirs = objectives.labels(src.data)[1] if src.objective == 'classification' else None
    eps, their_tok = src.model.get('ln_eps', model_lib.GPTConfig.ln_eps), src.tokenizer
    theirs_encoding = checkpoint.saved_data(directory, step).get('tokenizer')  # If recorded.
    problems = []
  if eps != model_cfg.ln_eps:
    problems.append(f'model.ln_eps: run {model_cfg.ln_eps} vs source {eps}')
  if theirs_encoding is None:  # An HF source, or a checkpoint from before the fingerprint.
    try:  # (A source's tokenizer that is gone, e.g. a moved directory, cannot be compared.)
      theirs_encoding = tokenizer_lib.fingerprint(tokenizer_lib.build(their_tok))
    except (FileNotFoundError, OSError, config_lib.ConfigError):
      pass
  if theirs_encoding not in (None, tokenizer_lib.fingerprint(tok)):
    problems.append(f'tokenizer: run {tok.spec} vs source {their_tok}, which encode text '
                    f'differently (the embeddings would stand for other tokens)')
  ours, theirs = placeholder_free(label_names), placeholder_free(theirs)
  if ours and theirs and ours != theirs:
    problems.append(f'data.label_names: run {ours} vs source head {theirs} (give the same names '
                    f'in the same order)')
  if problems:
    raise checkpoint.CheckpointMismatch(f'init_from {source} does not match the run: '
                                        + '; '.join(problems))


def init_params(source, model_cfg, params, shardings, workdir, tok, label_names=None):
  """Params from `source` (a jaxft workdir / step dir, or hf:<dir or hub id>) for fine-tuning:
  shared params loaded, a head the source lacks fresh from `params`. Logs what was loaded and
  lists it in <workdir>/init_from.json. `tok` and `label_names`: the run's tokenizer and classes
  (see check_source)."""
  check_source(source, model_cfg, label_names, tok)
  new_ok = lambda path: path == model_lib.HEAD
  if source.startswith('hf:'):
    from jaxft import convert  # Needs the `hf` extra (safetensors).
    params, report = convert.load_params(convert.local_dir(source[3:]), model_cfg, params,
                                         shardings, new_ok)
  else:
    params, report = checkpoint.restore_params(source, params, shardings, new_ok)
  log(f'init_from {report["source"]} (fresh optimizer): loaded {len(report["loaded"])} '
      f'params (listed in init_from.json); new (freshly initialised): '
      f'{", ".join(report["new"]) or "none"}; not used: {", ".join(report["ignored"]) or "none"}')
  if jax.process_index() == 0:
    config_lib.write_file(workdir, 'init_from.json', json.dumps(report, indent=1))
  return params


def check_batch(cfg, mesh):
  """train.batch_size in whole micro-batches (train.grad_accum) over the batch's devices."""
  shards, T = mesh.shape['data'] * mesh.shape['fsdp'], cfg.train
  if shards % jax.process_count():  # Each process feeds its own rows: the rows must be split.
    raise config_lib.ConfigError(
        f'mesh.data x mesh.fsdp = {shards} must be a multiple of the {jax.process_count()} '
        f'processes: each process loads its own rows of the batch, which a batch replicated '
        f'across processes (mesh.tensor spanning them) would not see whole')
  if T.batch_size % (T.grad_accum * shards):
    raise config_lib.ConfigError(
        f'train.batch_size={T.batch_size} must divide into train.grad_accum={T.grad_accum} '
        f'micro-batches over mesh.data x mesh.fsdp = {shards} devices')


def setup(cfg, tok, objective, mesh):
  """What a run trains, built from the config without allocating anything (run() and
  jaxft.bench): model_cfg, trainable, tx, lr_schedule, graphdef, abstract (state), shardings,
  init_fn, train_step and param_sizes ({path: size})."""
  check_batch(cfg, mesh)
  model_cfg = objectives.model_config(cfg, tok, mesh.devices.flat[0].platform)
  objectives.check_positions(cfg, model_cfg)
  trainable = trainable_fn(cfg, objective)
  tx, lr_schedule = optim.build(cfg.optim, cfg.train.steps, trainable)
  graphdef, abstract, shardings, init_fn = build_state(cfg, model_cfg, tx, mesh)
  train_step = make_train_step(graphdef, objective, tx, lr_schedule, cfg.train.grad_accum,
                               trainable, shardings['opt_state'])
  param_sizes = {model_lib.path_str(p): x.size
                 for p, x in jax.tree_util.tree_leaves_with_path(abstract['params'])}
  return types.SimpleNamespace(
      model_cfg=model_cfg, trainable=trainable, tx=tx, lr_schedule=lr_schedule, graphdef=graphdef,
      abstract=abstract, shardings=shardings, init_fn=init_fn, train_step=train_step,
      param_sizes=param_sizes)


def finished_steps(workdir):
  """The steps of the run <workdir>/summary.json records as finished; None without one, or with
  one that is unreadable (cut short): its final evaluation is then run again and rewritten."""
  path = epath.Path(workdir) / 'summary.json'
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())['steps']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    log(f'{path} is unreadable ({type(e).__name__}: {e}): the run is evaluated again')
    return None


def run(cfg, workdir):
  """Train per `cfg` in `workdir` (resuming if it holds a checkpoint). Returns the final state."""
  # From the start: a notice during set-up is kept too. `closing` closes the checkpoint manager
  # however the run ends (an error or interrupt in set-up too), before the handlers go back.
  with Preemption() as preempted, contextlib.ExitStack() as closing:
    mesh = sharding.make_mesh(cfg.mesh)
    log(f'mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, '
        f'{jax.process_count()} process(es)')
    T = cfg.train
    check_batch(cfg, mesh)  # Before the data is read: fail fast.
    if cfg.optim.warmup_steps >= T.steps:  # (optim.schedule clips the warm-up to the run.)
      log(f'note: optim.warmup_steps={cfg.optim.warmup_steps} >= train.steps={T.steps}: the '
          f'learning rate rises for the whole run and never reaches optim.lr={cfg.optim.lr:g}')
    tok = tokenizer_lib.build(cfg.tokenizer)
    objective = objectives.get(cfg.objective)
    records, examples, skipped = prepare_splits(cfg, objective, tok)
    built = setup(cfg, tok, objective, mesh)
    model_cfg, trainable, abstract, shardings = (built.model_cfg, built.trainable, built.abstract,
                                                 built.shardings)
    sizes = built.param_sizes
    n_train = sum(n for k, n in sizes.items() if trainable is None or trainable(k))
    if n_train == 0:
      raise config_lib.ConfigError(f'train.trainable={T.trainable!r} matches no parameter; paths '
                                   f'look like {", ".join(list(sizes)[:4])}')
    log(f'model {model_cfg} with {sum(sizes.values()):,} params, {n_train:,} trainable')
    checkpoint.check_storage(workdir, sum(x.size * x.dtype.itemsize
                                          for x in jax.tree.leaves(abstract)))

    mngr = closing.enter_context(checkpoint.manager(workdir, cfg.checkpoint))
    train_iter = objective.stream(records['train'], tok, cfg.data, T.batch_size, cfg.seed)
    # Cumulative counts travel with the data position in the checkpoint, and which held-out
    # records the run is evaluated on (keep_best compares losses across a resume).
    totals = {'tokens': 0.0, 'supervised_tokens': 0.0, 'skipped_steps': 0.0}
    held_out = {s: data.fingerprint(records[s]) for s in ('val', 'test')}
    encoding = tokenizer_lib.fingerprint(tok)
    if mngr.latest_step() is not None:
      if mngr.latest_step() > T.steps:  # Before the restore (and its 'resumed from' line).
        raise config_lib.ConfigError(
            f'train.steps={T.steps} is below the step of {workdir}\'s checkpoint, '
            f'{mngr.latest_step()}: give train.steps >= {mngr.latest_step()}')
      changes = config_lib.resume_changes(cfg, workdir)
      saved = checkpoint.resume_data(mngr.directory, mngr.latest_step())
      if saved.get('tokenizer', encoding) != encoding:
        raise checkpoint.CheckpointMismatch(
            f'tokenizer={cfg.tokenizer!r} encodes text differently from the tokenizer {workdir} '
            f'was trained with (its checkpoint\'s fingerprint): was it retrained or replaced? '
            f'Resume with that one, or start a new workdir (train.init_from to keep the params)')
      changed = [s for s, f in saved.get('held_out', held_out).items() if held_out[s] != f]
      if changed:
        raise data.DataError(f'the {" and ".join(changed)} records differ from those the run was '
                             f'evaluated on before (its checkpoint\'s fingerprint): resume with '
                             f'the saved data (a run from before data.split_seed was split by its '
                             f'seed: give data.split_seed=<that seed>), or start a new workdir '
                             f'with train.init_from')
      train_iter.set_state(saved['iterator'])  # (Refuses other train records.)
      totals.update(saved['totals'])
      state = checkpoint.restore(mngr, abstract, shardings)
      log(f'resumed from {mngr.directory}/{mngr.latest_step()}' + ''.join(
          f'; {k} {a!r} -> {b!r}' for k, a, b in changes)
          + ('; the lr schedule now ends at the new train.steps' if int(state['step']) < T.steps
             and any(k == 'train.steps' for k, *_ in changes) else ''))
    else:
      state = built.init_fn()
      if T.init_from:
        label_names = (objectives.labels(cfg.data)[1] if cfg.objective == 'classification'
                       else None)
        state['params'] = init_params(T.init_from, model_cfg, state['params'], shardings['params'],
                                      workdir, tok, label_names)
    step = int(state['step'])
    if step == T.steps and finished_steps(workdir) == step:  # (Not a shorter run's end.)
      log(f'{workdir} already holds the final step {step}; nothing to do')
      return state
    # Written only now that the config has proven it fits the workdir's checkpoint and there is
    # something to train: a bad rerun must not overwrite the record of what was trained.
    if jax.process_index() == 0:
      config_lib.save(cfg, workdir)
      if skipped:
        config_lib.write_file(workdir, 'skipped_records.txt', '\n'.join(skipped) + '\n')

    train_step = built.train_step
    evaluator = evaluate.Evaluator(built.graphdef, objective, examples, records, tok, cfg, mesh)
    baselines = {s: objectives.baselines(objective, records['train'], records[s], examples[s], tok,
                                         cfg.data, T.exact_match_examples)
                 for s in ('val', 'test')}
    metrics_log = MetricsLog(workdir, step, evaluated_again=step == T.steps)
    progress = Progress(step, T.steps)
    window = {'tokens': 0.0, 'time': time.time()}
    final, started = {}, time.time()

    def run_eval(split, max_batches):
      result = evaluator(state['params'], split, max_batches)
      metrics_log.write(step, split, result)
      if jax.process_index() == 0:
        evaluate.write_report(workdir, cfg, step, split, result, baselines[split], max_batches)
      log(f'step {step} {split}: ' + summary(result) + ' | baselines: ' + summary(baselines[split]))
      final[split] = result
      return result

    def save(val=None, measure=True):
      """Checkpoint the state; keep_best ranks it by the val loss of train.eval_batches batches:
      `val`'s where that was just measured so, else measured now unless not to `measure` (then
      it ranks last)."""
      metrics = None
      if cfg.checkpoint.keep_best:
        metrics = {'val_loss': val['loss'] if val else
                   evaluator.loss(state['params'], 'val', T.eval_batches) if measure else math.inf}
      checkpoint.save(mngr, state, {'iterator': train_iter.get_state(), 'totals': totals,
                                    'held_out': held_out, 'tokenizer': encoding}, metrics)

    def record(at_step, metrics):
      """Check and log one step's metrics (blocks until that step has run)."""
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      finite = np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])
      if not finite:
        where = (f'non-finite loss {m["loss"]} / grad_norm {m["grad_norm"]} at step {at_step} '
                 f'(batch {at_step - 1} of the train stream)')
        in_a_row, allowed = int(m['nonfinite_in_a_row']), cfg.optim.skip_nonfinite
        if in_a_row > allowed:  # apply_if_finite let this update through: the state is spoilt.
          raise FloatingPointError(
              f'{where}; stopping without saving this state' + (
                  f' ({in_a_row} in a row > optim.skip_nonfinite={allowed})' if allowed else
                  ' (optim.skip_nonfinite=N skips up to N such steps in a row)'))
        totals['skipped_steps'] += 1
        log(f'{where}: update skipped ({in_a_row} in a row, {int(totals["skipped_steps"])} in all)')
      if m['supervised_tokens'] == 0:
        raise data.DataError(f'train batch at step {at_step} has no supervised token')
      if finite:  # A skipped step trained on nothing.
        totals['tokens'] += m['tokens']
        totals['supervised_tokens'] += m['supervised_tokens']
        window['tokens'] += m['tokens']
      if at_step % T.log_every == 0 or at_step == T.steps:
        now = time.time()
        line = {**m, 'tokens_per_s': window['tokens'] / max(now - window['time'], 1e-9),
                'total_tokens': totals['tokens'],
                'total_supervised_tokens': totals['supervised_tokens'],
                'skipped_steps': totals['skipped_steps']}
        metrics_log.write(at_step, 'train', line)
        progress.update(at_step, line)
        window.update(tokens=0.0, time=now)

    pending = None
    try:
      while step < T.steps:
        batch = next(train_iter)
        del batch['record_ids']  # Host-side provenance: which records each row holds.
        batch = sharding.shard_batch(batch, mesh)
        state, metrics = train_step(state, batch)
        step += 1
        # The previous step's metrics are read while this one runs: the device never waits for
        # the host, yet a NaN is caught before any later state can be saved (saves follow a sync).
        if pending:
          record(*pending)
        pending = (step, metrics)
        stopping = preempted(step)  # Read once: a notice landing mid-iteration waits for the next.
        evaluate_now = step % T.eval_every == 0
        save_now = step % cfg.checkpoint.every == 0 or stopping
        if evaluate_now or save_now or step == T.steps:
          record(*pending)
          pending = None
        if step == T.steps:
          break  # The final evaluation and checkpoint follow the loop.
        paused = time.time()  # Evaluating and saving are not training: tokens_per_s leaves them out.
        val = run_eval('val', T.eval_batches) if evaluate_now else None
        if save_now:  # (A preemption save ranks last: its grace time is better spent writing.)
          save(val, measure=not stopping)
        window['time'] += time.time() - paused
        if stopping:
          checkpoint.wait(mngr)  # Saved means on disk: a second notice may kill us after this.
          log(f'{preempted.what}: saved step {step}, exiting; rerun the same command to resume')
          break
      if step == T.steps:  # Also when SIGTERM came during the last step: the end is saved,
        if mngr.latest_step() != step:  # first (ranked as the others), then evaluated whole.
          save()
        checkpoint.wait(mngr)  # summary.json only once the final checkpoint is on disk.
        run_eval('val', 0), run_eval('test', 0)
        dropped = sum(d for *_, d in train_iter.get_state()['slots'])  # (Gathered: all processes.)
        if jax.process_index() == 0:
          config_lib.write_file(workdir, 'summary.json', json.dumps(
              {'objective': cfg.objective, 'steps': step, 'tokens': totals['tokens'],
               'supervised_tokens': totals['supervised_tokens'], 'train_dropped': dropped,
               'wall_s': round(time.time() - started, 1),  # This process (resumes add up).
               'val': final['val'], 'test': final['test'], 'baselines': baselines}, indent=1))
    finally:
      progress.close()
      metrics_log.close()
      checkpoint.wait(mngr)
    return state


def initialize_distributed(d):
  """jax.distributed.initialize per config.distributed (before anything touches a device).

  Settings jax would stumble on (a process id out of range, an address without its port, a
  missing one outside TPU VMs / SLURM / Open MPI) are named by their keys; so are settings given
  with distributed.enabled=False, which would be ignored: every process training alone.
  """
  given = {k: v for k, v, unset in (('coordinator_address', d.coordinator_address, ''),
                                    ('num_processes', d.num_processes, 0),
                                    ('process_id', d.process_id, -1)) if v != unset}
  shown = ', '.join(f'distributed.{k}={v!r}' for k, v in given.items())
  if not d.enabled:
    if given:
      raise config_lib.ConfigError(
          f'{shown} given with distributed.enabled=False: each process would train alone (into '
          f'the same workdir); add --config.distributed.enabled=True (or unset them to run one '
          f'process)')
    return
  if given.get('process_id', -1) >= given.get('num_processes', math.inf):
    raise config_lib.ConfigError(f'distributed.process_id={d.process_id} must be below '
                                 f'distributed.num_processes={d.num_processes} (ids count from 0)')
  host, _, port = d.coordinator_address.rpartition(':')
  if d.coordinator_address and not (host and port.isdecimal()):
    raise config_lib.ConfigError(f'distributed.coordinator_address={d.coordinator_address!r} '
                                 f'must be host:port (of process 0)')
  # Every process says what it waits for: a peer that never comes ends the wait after
  # distributed.timeout_s in an abort of jax's that names no setting.
  print(f'jax.distributed: process {given.get("process_id", "(detected)")} of '
        f'{given.get("num_processes", "(detected)")} joining '
        f'{d.coordinator_address or "(detected coordinator)"}, waiting up to '
        f'distributed.timeout_s={d.timeout_s} s for all', flush=True)
  try:
    jax.distributed.initialize(**given, initialization_timeout=d.timeout_s)
  except ValueError as e:  # (What it cannot detect: jax names its argument, not our key.)
    raise config_lib.ConfigError(
        f'jax.distributed.initialize ({shown or "nothing given: detect"}): {e} Outside TPU VMs, '
        f'SLURM and Open MPI give distributed.coordinator_address=host:port (of process 0), '
        f'distributed.num_processes and distributed.process_id') from None


def reuse_host_memory():
  """Make glibc's malloc keep freed memory for reuse: one arena, no mmap'd chunks, no trimming.

  XLA on CPU allocates each step's temporaries (the activations: most of the step memory) afresh,
  from a worker thread; by default every large buffer is then a fresh mmap whose pages the kernel
  faults in and zeroes on first touch, every step (demo size: 160k faults, 0.37 s of kernel time
  per 1 s step). Runs before the backend starts its threads (a thread keeps the arena it first
  used). The process no longer hands freed memory back to the OS. False where malloc is not
  glibc's (macOS, musl): nothing changed."""
  if platform.libc_ver()[0] != 'glibc':
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
  mallopt = ctypes.CDLL(None).mallopt
  # A trim threshold of -1 is SIZE_MAX to glibc (the value is converted to size_t): never trim.
  return all(mallopt(param, value) == 1 for param, value in
             ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))


def configure_process(cfg):
  """The process-wide settings of `cfg` (jaxft.train and jaxft.bench), before the backend
  starts."""
  if cfg.reuse_host_memory:
    reuse_host_memory()
  if cfg.threefry_gpu_kernel:
    jax.config.update('jax_threefry_gpu_kernel_lowering', True)


def main(argv):
  cfg, workdir = config_lib.parse_args(argv)
  configure_process(cfg)
  if cfg.compile_cache:
    # Keyed by the program, compile options, devices and jax/XLA versions, so a changed config or
    # upgrade compiles afresh; an unreadable entry is warned about and compiled again.
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cfg.compile_cache))
  initialize_distributed(cfg.distributed)
  if jax.process_index() == 0:
    print(cfg)
  run(cfg, workdir)


if __name__ == '__main__':
  from jaxft import cli
  cli.run(main)
