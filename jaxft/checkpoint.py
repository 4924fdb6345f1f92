"""Orbax checkpoints: params, optimizer state, step, RNG and the data iterator position.

Items are saved separately so that `init_from` can read params alone, and every restore goes into
an abstract target carrying the *current* mesh's shardings: resuming onto another mesh is free.
"""
import contextlib
import json
import math
import os
import shutil

import jax
import ml_collections
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry as handler_registry
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxft import model


def manager(workdir, ckpt_cfg):
  """CheckpointManager for <workdir>/checkpoints: keep the newest N, plus the best val loss."""
  policies, val_loss = [pp.LatestN(n=ckpt_cfg.keep)], lambda m: m['val_loss']
  if ckpt_cfg.keep_best:
    # BestN keeps the last n after sorting; reverse=True sorts descending, so it keeps the lowest.
    policies.append(pp.BestN(get_metric_fn=val_loss, reverse=True, n=1,
                             keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=ckpt_cfg.async_save, cleanup_tmp_directories=True,
      preservation_policy=pp.AnyPreservationPolicy(policies),
      # Without best_fn orbax writes no metrics: a resumed run's BestN would have forgotten
      # which checkpoint was best and deleted it.
      best_fn=val_loss if ckpt_cfg.keep_best else None, best_mode='min')
  # One process writes each replicated array whole. Orbax's default on CPU and TPU, the
  # replica-parallel save, cuts it into a slice per replica instead, and every slice is a
  # program compiled per array shape and device: the first save of a 2-layer model on 8 devices
  # compiled 240 of them (20 s). It pays off only across processes, which split the writing.
  # (orbax 0.12 has no public switch: this is its default handler with that one setting, put in
  # its place without the warning register_type_handler logs for every override.)
  handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
      use_replica_parallel=jax.process_count() > 1,
      array_metadata_store=array_metadata_store.Store()), override=True, ignore_warnings=True)
  return ocp.CheckpointManager(absolute(workdir) / 'checkpoints', options=options)


def absolute(path):
  """An epath.Path: local paths made absolute (a ~ no shell expanded, as in
  --config.train.init_from=~/runs/x, is the home directory), remote ones (gs://...) as given."""
  return epath.Path(path if '://' in str(path) else os.path.abspath(os.path.expanduser(path)))


class StorageError(RuntimeError):
  """The workdir cannot take what the run has to write (unwritable, full); names the path."""


def check_storage(workdir, checkpoint_bytes):
  """Fail before training if the workdir cannot be written or has no room for one checkpoint."""
  directory = absolute(workdir) / 'checkpoints'
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f'.write-probe-{jax.process_index()}-{os.getpid()}'
    probe.write_bytes(bytes(4096))
    probe.unlink()
  except OSError as e:
    raise StorageError(f'workdir {workdir} is not writable: {e}') from None
  if '://' in str(directory):
    return  # Object stores have no free-space figure to check.
  free = shutil.disk_usage(directory).free
  if free < checkpoint_bytes:
    raise StorageError(f'workdir {workdir} has {free / 2**20:,.1f} MiB free, less than one '
                       f'checkpoint ({checkpoint_bytes / 2**20:,.1f} MiB of params and optimizer '
                       f'state): free space or use another --workdir')


@contextlib.contextmanager
def storage_errors(mngr):
  """A failed checkpoint write (possibly from the background thread of an async save) becomes a
  StorageError naming the unfinished step and the newest complete one, which orbax leaves intact
  (a step is only renamed into place once fully written)."""
  try:
    yield
  except (OSError, ValueError, RuntimeError) as e:  # As raised by the OS, tensorstore, orbax.
    names = [p.name for p in mngr.directory.iterdir()] if mngr.directory.is_dir() else []
    failed = sorted(n.split('.')[0] for n in names if n.endswith('.orbax-checkpoint-tmp'))
    done = ocp.utils.checkpoint_steps(mngr.directory) if names else []
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise StorageError(
        f'writing checkpoint {", ".join(failed) or "?"} in {mngr.directory} failed '
        f'({type(e).__name__}: {first}); newest complete checkpoint: '
        f'{max(done) if done else "none"} (intact). Free space / fix the workdir, then rerun to '
        f'resume from it') from e


def save(mngr, state, data_state, metrics=None):
  """Save a train state (dict with params/opt_state/step/rng) and the data iterator state, with
  the `metrics` keep_best ranks it by (a non-finite one as +inf: orbax would rank a NaN first)."""
  step = int(state['step'])
  if metrics:
    metrics = {k: float(v) if math.isfinite(v) else math.inf for k, v in metrics.items()}
  with storage_errors(mngr):  # Also reports the failure of the previous (async) save.
    mngr.save(step, metrics=metrics, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state['params']),
        train=ocp.args.StandardSave({k: v for k, v in state.items() if k != 'params'}),
        data=ocp.args.JsonSave(data_state)))


def wait(mngr):
  """Block until the last save is on disk, failing with a StorageError if it could not be."""
  with storage_errors(mngr):
    mngr.wait_until_finished()


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _shapes(tree):
  return {model.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


class CheckpointMismatch(ValueError):
  """Saved params that do not fit the model being built."""


def check_params(params_dir, abstract_params, new_ok=None):
  """Fail, listing every difference, if saved params do not fit the model being built.

  Strict by default (resuming): both hold exactly the same params. For fine-tuning, params for
  which new_ok(path) holds may be absent from the checkpoint, and saved params the model lacks
  are tolerated. Returns (saved shapes, model shapes) by path.
  """
  # (The item's handler: the Checkpointer would look for a step's metadata in the item dir, warn.)
  try:
    saved = _shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(params_dir)))
  except FileNotFoundError as e:
    raise CheckpointMismatch(f'checkpoint {params_dir} is unreadable: {e}') from None
  want = _shapes(abstract_params)
  problems = [f'{k}: checkpoint {saved[k]} vs model {want[k]}'
              for k in want if k in saved and saved[k] != want[k]]
  problems += [f'missing in checkpoint: {k} {want[k]}'
               for k in want if k not in saved and not (new_ok and new_ok(k))]
  if new_ok is None:
    problems += [f'not in model: {k} {saved[k]}' for k in saved if k not in want]
  if problems:
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise CheckpointMismatch(f'checkpoint {params_dir} does not match the model config '
                             f'({len(problems)} differences):\n  ' + '\n  '.join(problems[:20]) + more)
  return saved, want


def _damaged(directory, step):
  """The hint for a checkpoint that fails to read. (Only on failure: listing the steps is a round
  trip on remote storage.)"""
  others = sorted(s for s in ocp.utils.checkpoint_steps(directory) if s != step)
  return (f'\nIf the config is the run\'s own, checkpoint {step} may be damaged (a file lost '
          f'or cut): move {directory}/{step} aside to resume from ' +
          (f'step {others[-1]}' if others else 'scratch'))


def restore(mngr, abstract_state, shardings, step=None):
  """The state of `step` (default: latest), placed with `shardings` (its data state is
  saved_data's, read first). The caller has compared the config with the run's: a checkpoint
  that does not fit it then is damaged, or was written with another optimizer layout, and the
  error says which earlier step would resume."""
  step = mngr.latest_step() if step is None else step
  hint = lambda: _damaged(mngr.directory, step)
  rest = lambda t: {k: v for k, v in t.items() if k != 'params'}
  try:
    check_params(mngr.directory / str(step) / 'params', abstract_state['params'])
  except CheckpointMismatch as e:
    raise CheckpointMismatch(f'{e}{hint()}') from None
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(abstract_state['params'], shardings['params'])),
        train=ocp.args.StandardRestore(_abstract(rest(abstract_state), rest(shardings)))))
  except Exception as e:  # The params' shapes fit (checked above): their data, or the optimizer's.
    raise CheckpointMismatch(
        f'checkpoint {mngr.directory}/{step} could not be restored: its optimizer state does not '
        f'fit this config\'s optimizer (was optim.clip_norm or train.trainable changed? resume '
        f'with the saved config.json, or start a new workdir with train.init_from), or a file of '
        f'it is damaged: {type(e).__name__}: {str(e).strip().splitlines()[0]}{hint()}') from e
  return {'params': out.params, **out.train}


def saved_data(directory, step):
  """The data state saved with checkpoint `step` in `directory` (the train position and
  fingerprints), read alone; {} for params without one (`convert from-hf`'s)."""
  path = epath.Path(directory) / str(step) / 'data'
  if not path.exists():
    return {}
  try:
    return ocp.JsonCheckpointHandler().restore(path)
  except (OSError, ValueError) as e:
    raise CheckpointMismatch(f'checkpoint {directory}/{step}: its data state is unreadable: '
                             f'{type(e).__name__}: {e}{_damaged(directory, step)}') from None


def resume_data(directory, step):
  """saved_data of checkpoint `step`, to resume from: one without (params alone) is refused."""
  saved = saved_data(directory, step)
  if 'iterator' not in saved:
    raise CheckpointMismatch(
        f'checkpoint {directory}/{step} has no data item (the train position), so it cannot be '
        f'resumed: it holds params alone (as `jaxft.convert from-hf` writes them) or lost its '
        f'data/. To train from its params, use a new --workdir with '
        f'--config.train.init_from={directory}/{step}{_damaged(directory, step)}')
  return saved


def resolve(path):
  """A workdir, its checkpoints/ dir or one step dir -> (checkpoints dir, step)."""
  path = absolute(path)
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  if (path / 'params').is_dir():  # A step directory.
    if not path.name.isdigit():  # An orbax <step>.orbax-checkpoint-tmp, still being written.
      steps = sorted(ocp.utils.checkpoint_steps(path.parent))
      raise FileNotFoundError(f'{path} is not a finished checkpoint (finished steps there: '
                              f'{", ".join(map(str, steps)) or "none"})')
    return path.parent, int(path.name)
  if not path.is_dir():
    steps = ocp.utils.checkpoint_steps(path.parent) if path.parent.is_dir() else []
    raise FileNotFoundError(f'no jaxft checkpoint at {path}' + (
        f' (that directory has steps {", ".join(map(str, sorted(steps)))})' if steps else ''))
  steps = ocp.utils.checkpoint_steps(path)
  if not steps:
    raise FileNotFoundError(f'{path} holds no finished checkpoint')
  return path, max(steps)


def restore_params(path, params, shardings, new_ok):
  """Params from a jaxft checkpoint (workdir or step dir) onto the current mesh, for fine-tuning.

  Every param the model shares with the checkpoint is loaded; params for which new_ok(path) holds
  (a new objective's head) may be missing and keep their value in `params` (fresh init); saved
  params the model has no use for (an old head) are left out. Returns (params, report) where
  report lists 'loaded', 'new' and 'ignored' paths and the 'source' step dir.
  """
  directory, step = resolve(path)
  params_dir = directory / str(step) / 'params'
  saved, want = check_params(params_dir, params, new_ok)
  flat_shardings = {model.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  target = {}
  for p, x in jax.tree_util.tree_leaves_with_path(params):
    key = model.path_str(p)
    if key in saved:
      node = target
      for part in key.split('/'):
        node = node.setdefault(part, {})
      node['value'] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat_shardings[key])
  # The params item alone, read as a tree (a manager, read-only, would log three warnings).
  out = ocp.PyTreeCheckpointer().restore(params_dir, args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  loaded = {model.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(out)}
  report = {'loaded': sorted(loaded), 'new': sorted(k for k in want if k not in saved),
            'ignored': sorted(k for k in saved if k not in want), 'source': f'{directory}/{step}'}
  return model.map_with_path(lambda k, x: loaded.get(k, x), params), report


def run_config(path):
  """(the run's config, checkpoints dir, step) for a workdir or one of its step dirs."""
  directory, step = resolve(path)
  cfg_path = directory.parent / 'config.json'
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} not found: the run\'s config must sit next to its '
                            f'checkpoints/')
  saved = json.loads(cfg_path.read_text())
  # A run from before data.split_seed drew its demo corpus and held-out records by its seed.
  saved.setdefault('data', {}).setdefault('split_seed', saved.get('seed', 0))
  return ml_collections.ConfigDict(saved), directory, step
