"""The three objectives as data: masks token by token, packing, truncation, audit, metrics."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from jaxft import data, demo_data, evaluate, model as model_lib, objectives, optim, sharding, \
    tokenizer
from test_sharding import run_steps

TOK = tokenizer.build('bytes')
E, P = TOK.eos_id, TOK.pad_id


def recs(*dicts):
  return [(d, f'mem.jsonl:{i}') for i, d in enumerate(dicts, 1)]


def ids(text):
  return TOK.encode(text)


def encode(name, records, **overrides):
  return objectives.get(name).encode(records, TOK, small_config(**overrides).data)


def test_next_token_packs_documents_as_segments_token_by_token():
  ex = encode('next_token', recs({'text': 'ab'}, {'text': 'cde'}, {'text': 'fghijk'}),
              data__seq_len=4)
  f, g, h, i, j, k = ids('fghijk')
  # 'ab' fills a row alone ('cde' does not fit next to it); 'fghijk' + EOS spans two segments.
  np.testing.assert_array_equal(ex['tokens'], [ids('ab') + [P, P], ids('cde') + [P],
                                               [f, g, h, i], [j, k, P, P]])
  np.testing.assert_array_equal(ex['targets'], [ids('b') + [E, P, P], ids('de') + [E, P],
                                                [g, h, i, j], [k, E, P, P]])
  np.testing.assert_array_equal(ex['loss_mask'], [[1, 1, 0, 0], [1, 1, 1, 0], [1] * 4, [1, 1, 0, 0]])
  np.testing.assert_array_equal(ex['segment_ids'], [[1, 1, 0, 0], [1, 1, 1, 0], [1] * 4, [1, 1, 0, 0]])
  np.testing.assert_array_equal(ex['positions'], [[0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]])
  assert ex.sources == [['mem.jsonl:1'], ['mem.jsonl:2'], ['mem.jsonl:3'], ['mem.jsonl:3']]
  packed = encode('next_token', recs({'text': 'ab'}, {'text': 'c'}), data__seq_len=8)
  np.testing.assert_array_equal(packed['tokens'], [ids('abc') + [P] * 5])
  np.testing.assert_array_equal(packed['segment_ids'], [[1, 1, 2, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(packed['positions'], [[0, 1, 0, 0, 0, 0, 0, 0]])


def test_labeled_pair_supervises_completion_and_eos_only():
  pairs = recs({'prompt': '1+2=', 'completion': '3'}, {'prompt': '9-', 'completion': '45'})
  ex = encode('labeled_pair', pairs, data__seq_len=12, data__prompt_template='Q{prompt}')
  first = ids('Q1+2=3') + [E]
  second = ids('Q9-45') + [E]
  np.testing.assert_array_equal(ex['tokens'][0], first[:-1] + second[:-1] + [P])
  np.testing.assert_array_equal(ex['targets'][0], first[1:] + second[1:] + [P])
  # Loss on '3', EOS | '4', '5', EOS; never on the prompt, the padding or across examples.
  np.testing.assert_array_equal(ex['loss_mask'][0], [0, 0, 0, 0, 1, 1] + [0, 0, 1, 1, 1] + [0])
  np.testing.assert_array_equal(ex['segment_ids'][0], [1] * 6 + [2] * 5 + [0])
  np.testing.assert_array_equal(ex['positions'][0], list(range(6)) + list(range(5)) + [0])
  unpacked = encode('labeled_pair', pairs, data__seq_len=12, data__pack=False)
  assert unpacked['tokens'].shape == (2, 12) and unpacked.sources == [['mem.jsonl:1'], ['mem.jsonl:2']]


def test_truncation_sides_and_the_mask_audit():
  pair = recs({'prompt': 'abcdefgh', 'completion': 'xyz'})
  # left (default): the prompt loses its start, the completion + EOS survive whole.
  left = encode('labeled_pair', pair, data__seq_len=6)
  np.testing.assert_array_equal(left['tokens'][0], ids('fghxyz'))
  np.testing.assert_array_equal(left['targets'][0], ids('ghxyz') + [E])
  np.testing.assert_array_equal(left['loss_mask'][0], [0, 0, 1, 1, 1, 1])
  # right: the end is cut; with a prompt this long nothing of the completion is left.
  with pytest.raises(data.DataError, match=r'mem.jsonl:1: the prompt fills data.seq_len=6 .*'
                                           r'data.drop_unsupervised=True'):
    encode('labeled_pair', pair, data__seq_len=6, data__truncation_side='right')
  both = pair + recs({'prompt': 'a', 'completion': 'b'})
  ex = encode('labeled_pair', both, data__seq_len=6, data__truncation_side='right',
              data__drop_unsupervised=True)
  assert ex.dropped == 1 and ex['loss_mask'].sum() == 2 and len(ex['tokens']) == 1
  # A row without a supervised token names its records.
  ex['loss_mask'][0] = 0
  with pytest.raises(data.DataError, match=r'train row 0 has no supervised token; its records: '
                                           r'mem.jsonl:1'):
    objectives.audit(ex, 'train')
  with pytest.raises(data.DataError, match=r"mem.jsonl:1: field 'text' is empty"):
    encode('next_token', recs({'text': ''}))
  # Classification keeps the end of the text by default ('left'), the start with 'right'.
  cls = encode('classification', recs({'text': 'abcdefgh', 'label': 1}), data__seq_len=5)
  np.testing.assert_array_equal(cls['tokens'][0], ids('defgh'))
  cls = encode('classification', recs({'text': 'abcdefgh', 'label': 1}), data__seq_len=5,
               data__truncation_side='right')
  np.testing.assert_array_equal(cls['tokens'][0], ids('abcde'))


def test_classification_labels_by_int_or_name_and_bad_labels():
  ex = encode('classification', recs({'text': 'ab', 'label': 2}, {'text': 'c', 'label': 'low'}),
              data__seq_len=4)
  np.testing.assert_array_equal(ex['label'], [2, 0])
  np.testing.assert_array_equal(ex['tokens'], [ids('ab') + [P, P], ids('c') + [P] * 3])
  np.testing.assert_array_equal(ex['segment_ids'], [[1, 1, 0, 0], [1, 0, 0, 0]])
  for bad in (3, -1, 'huge', 1.0, True):
    with pytest.raises(data.DataError, match=r"mem.jsonl:2: field 'label' = .* is not a label"):
      encode('classification', recs({'text': 'a', 'label': 0}, {'text': 'b', 'label': bad}))
  with pytest.raises(data.DataError, match='3 names but data.num_labels=2'):
    encode('classification', recs({'text': 'a', 'label': 0}), data__num_labels=2)
  with pytest.raises(data.DataError, match=r"mem.jsonl:1: missing field 'label'"):
    encode('classification', recs({'text': 'a'}))
  # Names that are digits (star ratings): a name wins over an index, for JSON ints as for CSV
  # strings, so every file format reads the same classes.
  stars = dict(data__label_names='1,2,3,4,5', data__num_labels=0)
  ex = encode('classification', recs(*({'text': 'a', 'label': v} for v in (1, '1', 5, '5'))),
              **stars)
  np.testing.assert_array_equal(ex['label'], [0, 0, 4, 4])
  with pytest.raises(data.DataError, match=r"mem.jsonl:1: field 'label' = 0 is not a label"):
    encode('classification', recs({'text': 'a', 'label': 0}), **stars)


def tiny_model(num_labels=0, seed=0):
  cfg = small_config()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with sharding.activate(mesh):
    return model_lib.GPT(model_lib.config_from(cfg.model, TOK.vocab_size, num_labels),
                         nnx.Rngs(seed))


def per_example_losses(model, ex):
  """Summed loss of each example (segment), in order of appearance."""
  ce = np.asarray(objectives.token_losses(model, {k: np.asarray(v) for k, v in ex.items()}))
  out = []
  for row, seg in zip(ce, ex['segment_ids']):
    out += [row[seg == s].sum() for s in range(1, seg.max() + 1)]
  return np.array(out)


@pytest.mark.parametrize('name', ['next_token', 'labeled_pair'])
def test_packed_and_unpacked_give_the_same_per_example_losses(name):
  records = [(r, f'demo:{i}') for i, r in enumerate(demo_data.generate(40, seed=1))]
  packed = encode(name, records)
  unpacked = encode(name, records, data__pack=False)
  assert len(packed['tokens']) < len(unpacked['tokens']) == 40
  model = tiny_model()
  a, b = per_example_losses(model, packed), per_example_losses(model, unpacked)
  assert len(a) == 40 and a.min() > 0
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_classification_reads_the_last_real_token_whatever_the_padding():
  model = tiny_model(num_labels=3)
  rows = recs({'text': '12+34=', 'label': 1}, {'text': '9-9=', 'label': 0})
  short, long = (encode('classification', rows, data__seq_len=n) for n in (8, 24))
  logits = [np.asarray(objectives.class_logits(model, {k: np.asarray(v) for k, v in ex.items()}))
            for ex in (short, long)]
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)
  alone = np.asarray(model.classify(model.hidden(np.array([ids('9-9=')])), np.array([3])))
  np.testing.assert_allclose(logits[0][1], alone[0], rtol=1e-5, atol=1e-6)


def test_metrics_and_baselines_by_hand():
  cm = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 0]])
  m = objectives.class_metrics({'loss_sum': 7.0, 'count': 7.0, 'confusion': cm})
  f1 = [2 * 3 / (4 + 4), 2 * 2 / (2 + 3), 0.0]
  assert m['accuracy'] == pytest.approx(5 / 7) and m['macro_f1'] == pytest.approx(np.mean(f1))
  assert m['confusion'] == cm.tolist() and m['loss'] == 1.0
  cfg = small_config().data
  lm = objectives.get('next_token')
  V = TOK.vocab_size
  # Train targets of 'aab': a, b, EOS (one each); add-one smoothed over V: p = 2 / (3 + V) for
  # each of the eval targets of 'ab' (b, EOS).
  evals = recs({'text': 'ab'})
  assert objectives.baselines(lm, recs({'text': 'aab'}), evals, lm.encode(evals, TOK, cfg), TOK,
                              cfg) == {'unigram_loss': pytest.approx(-np.log(2 / (3 + V)))}
  cls = objectives.get('classification')
  labeled = lambda *ls: recs(*[{'text': 'x', 'label': l} for l in ls])
  got = objectives.baselines(cls, labeled(2, 2, 1), labeled(2, 0, 0, 1),
                             cls.encode(labeled(2, 0, 0, 1), TOK, cfg), TOK, cfg)
  assert got == {'majority_accuracy': 0.25}
  pairs = recs(*[{'prompt': 'q', 'completion': c} for c in ('7', '7', '8')])
  lp = objectives.get('labeled_pair')
  assert objectives.baselines(lp, pairs, pairs[1:], lp.encode(pairs[1:], TOK, cfg), TOK, cfg)[
      'constant_exact_match'] == 0.5
  # A bad record (a lazy dataset's, read unchecked) is left out here as from training.
  bad = recs({'prompt': 'q', 'completion': None}, {'prompt': 'q', 'completion': None})
  with pytest.raises(data.RecordError, match=r"field 'completion' must be a string, got NoneType"):
    objectives.baselines(lp, pairs + bad, pairs[1:], lp.encode(pairs[1:], TOK, cfg), TOK, cfg)
  with cfg.unlocked():
    cfg.on_error = 'skip'
  assert objectives.baselines(lp, pairs + bad, pairs[1:] + bad[:1], lp.encode(pairs[1:], TOK, cfg),
                              TOK, cfg)['constant_exact_match'] == 0.5


def test_an_empty_completion_is_a_bad_record():
  """It supervised the EOS alone, teaching that the prompt's answer is nothing (an empty text is
  a bad record too); data.on_error=skip leaves it out and lists it."""
  pairs = recs({'prompt': '1+2=', 'completion': '3'}, {'prompt': '4+4=', 'completion': ''})
  with pytest.raises(data.RecordError, match=r"^mem.jsonl:2: field 'completion' is empty$"):
    encode('labeled_pair', pairs)
  ex = encode('labeled_pair', pairs, data__on_error='skip')
  assert ex.skipped == ["mem.jsonl:2: field 'completion' is empty"]
  assert ex.sources == [['mem.jsonl:1']] and ex['loss_mask'].sum() == 2  # '3' and EOS.
  cfg = small_config(objective='labeled_pair', data__on_error='skip').data  # Exact match too.
  assert evaluate.exact_match_examples(pairs, TOK, cfg, P)['reference_len'].tolist() == [2]


def test_a_split_left_without_examples_says_why_and_names_a_record():
  """It said only 'no example with a supervised token among N records': not which file, nor
  whether seq_len cut the completions away or the records were bad and skipped."""
  long = recs({'prompt': 'x' * 20, 'completion': 'y'}, {'prompt': 'z' * 20, 'completion': 'w'})
  with pytest.raises(data.DataError, match=re.escape(
      'no example with a supervised token among 2 records: 2 dropped without one '
      '(data.drop_unsupervised; first: mem.jsonl:1)')):
    encode('labeled_pair', long, data__seq_len=8, data__truncation_side='right',
           data__drop_unsupervised=True)
  with pytest.raises(data.DataError, match=re.escape(
      "no example with a supervised token among 1 records: 1 bad records skipped "
      "(data.on_error=skip; first: mem.jsonl:1: missing field 'completion' (has: prompt))")):
    encode('labeled_pair', recs({'prompt': 'q'}), data__on_error='skip')


def test_constant_answer_baseline_scores_the_examples_exact_match_scores():
  """With data.drop_unsupervised, a record whose completion seq_len cuts away is not scored by
  exact match: the constant-answer baseline counted it as a miss (1/3 here instead of 1/2)."""
  cfg = small_config(objective='labeled_pair', data__seq_len=8, data__truncation_side='right',
                     data__drop_unsupervised=True).data
  lp = objectives.get('labeled_pair')
  train = recs(*[{'prompt': 'q', 'completion': c} for c in ('7', '7', '8')])
  evals = recs({'prompt': 'q', 'completion': '7'}, {'prompt': 'x' * 20, 'completion': '7'},
               {'prompt': 'q', 'completion': '8'})
  scored = evaluate.exact_match_examples(evals, TOK, cfg, P)
  assert len(scored['reference']) == 2
  got = objectives.baselines(lp, train, evals, lp.encode(evals, TOK, cfg), TOK, cfg)
  assert got['constant_exact_match'] == 0.5
  # On the first train.exact_match_examples records only, as exact match: '7' of '7' and '8'.
  two = recs(*[{'prompt': 'q', 'completion': c} for c in '78'])
  assert objectives.baselines(lp, train, two, lp.encode(two, TOK, cfg), TOK, cfg,
                              exact_match_records=1)['constant_exact_match'] == 1.0


def test_greedy_matches_stepwise_argmax_and_exact_match_counts():
  model = tiny_model(seed=3)
  prompts = [ids('12+'), ids('3-45=')]
  length, num_new = 10, 4
  tokens = np.full((2, length), P, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  out = np.asarray(evaluate.greedy(model, tokens, np.array([3, 5]), num_new))
  for p, got in zip(prompts, out):
    seq = list(p)
    for _ in range(num_new):
      seq.append(int(np.argmax(np.asarray(model(np.array([seq])))[0, -1])))
    assert list(got) == seq[len(p):]
  # Exact match on the mesh: row 0's reference is the model's own greedy answer, row 1's is not.
  cfg = small_config(objective='labeled_pair')
  pairs = recs({'prompt': '12+', 'completion': 'ab'}, {'prompt': '3-45=', 'completion': 'zz'})
  arrays = evaluate.exact_match_examples(pairs, TOK, cfg.data, P)
  assert arrays['reference'].shape == (2, 3)  # 'ab' / 'zz' + EOS.
  cut = small_config(objective='labeled_pair', data__seq_len=4, data__truncation_side='right')
  with pytest.raises(data.DataError, match=r'train.exact_match_examples: none of the first 2 '
                                           r'records keeps a completion within data.seq_len=4'):
    evaluate.exact_match_examples(recs({'prompt': '12345678', 'completion': 'ab'},
                                       {'prompt': 'abcdefgh', 'completion': 'c'}), TOK, cut.data, P)
  np.testing.assert_array_equal(arrays['reference'][1], ids('zz') + [E])
  arrays['reference'][0] = evaluate.greedy(model, arrays['tokens'], arrays['prompt_len'], 3)[0]
  graphdef, params = nnx.split(model)
  ev = evaluate.Evaluator(graphdef, objectives.get('labeled_pair'), {}, {}, TOK, cfg,
                          sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  assert ev.exact_match(params, arrays) == (0.5, 2)


@pytest.mark.parametrize('name', ['labeled_pair', 'classification'])
def test_objective_trains_the_same_on_a_mesh_of_8(name):
  one, _, _ = run_steps(small_config(objective=name, mesh__data=1), jax.devices()[:1])
  eight, _, _ = run_steps(small_config(objective=name, mesh__data=2, mesh__fsdp=2, mesh__tensor=2),
                          jax.devices())
  np.testing.assert_allclose(one, eight, rtol=2e-5)
  assert eight[-1] < eight[0]


def test_frozen_backbone_is_bitwise_unchanged_and_has_no_optimizer_state():
  cfg = small_config(objective='classification')
  trainable = optim.trainable_fn('head')
  _, full, _ = run_steps(cfg, jax.devices()[:1], num_steps=1)
  init = run_steps(cfg, jax.devices(), num_steps=0, trainable=trainable)[1]
  init = jax.device_get(init['params'])
  losses, state, _ = run_steps(cfg, jax.devices(), num_steps=4, trainable=trainable)
  after = jax.device_get(state['params'])
  assert losses[-1] < losses[0]
  changed = model_lib.map_with_path(lambda p, a, b: not np.array_equal(a, b), init, after)
  flat = {model_lib.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(changed)}
  assert flat.pop('score') and not any(flat.values())
  # AdamW moments only for score [embed, labels] (x2), plus step counts: nothing per frozen param.
  score_size = init['score'].size
  opt_floats = sum(x.size for x in jax.tree.leaves(state['opt_state']) if x.dtype == np.float32)
  full_floats = sum(x.size for x in jax.tree.leaves(full['opt_state']) if x.dtype == np.float32)
  assert opt_floats == 2 * score_size and full_floats > 100 * opt_floats


def test_bad_objective_settings_are_named():
  pair = recs({'prompt': 'a', 'completion': 'b'})
  with pytest.raises(data.DataError, match=r"data.prompt_template='Q: \{question\}' may only use "
                                           r"\{prompt\} \(got \{question\}\)"):
    encode('labeled_pair', pair, data__prompt_template='Q: {question}')
  for template, says in (('Q: {prompt', r": expected '\}' before end of string \(write a literal "
                                        r"brace as \{\{ or \}\}\)"),
                         ('{prompt.upper}', r' may only use \{prompt\} \(got \{prompt.upper\}\)'),
                         ('{prompt!x}', r': Unknown conversion specifier x')):
    with pytest.raises(data.DataError, match=re.escape(f'data.prompt_template={template!r}') + says):
      encode('labeled_pair', pair, data__prompt_template=template)
  for names in ('neg,pos,', 'a,a,b'):  # A class no record can be: refused, not a dead logit.
    with pytest.raises(data.DataError, match=rf"data.label_names='{names}' has an empty or "
                                             r"repeated name"):
      encode('classification', recs({'text': 'c', 'label': 'a'}), data__label_names=names)
  # '²' is a digit to str.isdigit, not a number: not a label, named (no int() traceback).
  with pytest.raises(data.RecordError, match=r"mem.jsonl:1: field 'label' = '²' is not a label"):
    encode('classification', recs({'text': 'c', 'label': '²'}))
  for name in ('labeled_pair', 'classification'):
    with pytest.raises(data.DataError, match="unknown data.truncation_side 'middle'"):
      encode(name, recs({'prompt': 'a', 'completion': 'b', 'text': 'c', 'label': 0}),
             data__truncation_side='middle')
  with pytest.raises(data.DataError, match="unknown objective 'nope'; known: next_token, "
                                           "labeled_pair, classification"):
    objectives.get('nope')
