"""The VQA task (`vlpjax.tasks.vqa`) on the embedded tiny world: heads on the four
tiny backbones, losses against hand-computed values, examples and their targets,
the resumable training iterator, answer vocabularies and the evaluation functions.
"""
import importlib
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from vlpjax.data import examples as examples_lib
from vlpjax.data import tables
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.models import DESIGNS, get_model
from vlpjax.models import heads as heads_lib
from vlpjax.tasks import vqa
from vlpjax.tasks import vqa_accuracy

BATCH = 4


@pytest.fixture(scope='module')
def info(data_config):
  return tables.dataset_info(data_config)


def tiny_model_config(design, info):
  config = importlib.import_module(f'configs.{design}').model_config('tiny')
  config.vocab_size = info['vocab_size']
  return config


def examples_of(data_config, design, head, indices, split='train', **overrides):
  config = ml_collections.ConfigDict(data_config.to_dict())
  config.update(overrides)
  examples, _ = vqa.open_examples(config, design, split=split, head=head)
  return examples.examples(indices)


# ----------------------------------------------------------------------------
# Heads and the model.


def random_params(module, *args, seed=0, **kwargs):
  """Params of `module` drawn with numpy (N(0, 0.1)): the shapes come from
  `eval_shape`, so no initialiser is compiled (which costs the tiny ViLBERT ~20 s)."""
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)


def shapes_of(tree):
  return jax.tree.map(lambda x: x.shape, nn.meta.unbox(tree))


@pytest.mark.parametrize('design', DESIGNS)
def test_model_outputs_and_params_tree(data_config, info, design):
  """Both heads on each design: logits float32 [B, A]; params {'backbone', head},
  the backbone's tree that of the backbone alone and of the pretraining module's
  params['backbone'] (so a pretraining checkpoint's backbone loads); the
  default head runs and gives finite logits."""
  model_config = tiny_model_config(design, info)
  num_answers = info['num_answers']
  backbone = get_model(model_config, pretraining=False)
  rng = jax.random.PRNGKey(0)
  for head in vqa.HEAD_KINDS:
    batch = examples_of(data_config, design, head, np.arange(BATCH))
    inputs = {k: jnp.asarray(v) for k, v in vqa.model_inputs(batch).items()}
    model = vqa.build_model(model_config, num_answers, head=head)
    variables = jax.eval_shape(lambda: model.init(rng, **inputs))
    params = variables['params']
    assert set(params) == {'backbone', vqa.HEAD_PARAM_NAMES[head]}
    backbone_inputs = {k: v for k, v in inputs.items() if k != 'answer_slot'}
    own = jax.eval_shape(lambda: backbone.init(rng, **backbone_inputs))['params']
    assert shapes_of(params['backbone']) == shapes_of(own)
    logits = jax.eval_shape(lambda v: model.apply(v, **inputs), variables)['logits']
    assert logits.shape == (BATCH, num_answers) and logits.dtype == jnp.float32

  pretraining = get_model(model_config, pretraining=True)
  mlm_positions = jnp.zeros((BATCH, 2), jnp.int32)
  pretrained = jax.eval_shape(lambda: pretraining.init(
      rng, **backbone_inputs, mlm_positions=mlm_positions))['params']
  assert shapes_of(pretrained['backbone']) == shapes_of(own)

  model = vqa.build_model(model_config, num_answers)
  assert model.head == vqa.HEADS[design]
  batch = examples_of(data_config, design, model.head, np.arange(BATCH))
  inputs = vqa.model_inputs(batch)
  logits = jax.jit(model.apply)({'params': random_params(model, **inputs)}, **inputs)['logits']
  assert logits.shape == (BATCH, num_answers)
  assert np.isfinite(np.asarray(logits)).all()


def test_heads_read_what_they_should(data_config, info):
  """mask_slot: Dense of the backbone's text state at answer_slot; pooled_mlp:
  AnswerHead of the backbone's pooled output (ViLBERT: text * image pooled)."""
  for design, head in (('visualbert', 'mask_slot'), ('vilbert', 'pooled_mlp')):
    model_config = tiny_model_config(design, info)
    batch = examples_of(data_config, design, head, np.arange(BATCH))
    inputs = vqa.model_inputs(batch)
    model = vqa.build_model(model_config, info['num_answers'], head=head)
    params = random_params(model, **inputs)
    # jit: one compile instead of one per op (ViLBERT's are many).
    logits = jax.jit(model.apply)({'params': params}, **inputs)['logits']
    backbone = get_model(model_config, pretraining=False)
    backbone_inputs = {k: v for k, v in inputs.items() if k != 'answer_slot'}
    out = jax.jit(backbone.apply)({'params': params['backbone']}, **backbone_inputs)
    head_params = params[vqa.HEAD_PARAM_NAMES[head]]
    if head == 'mask_slot':
      hidden = np.asarray(out['text'])[np.arange(BATCH), batch['answer_slot']]
      want = hidden @ head_params['output']['kernel'] + head_params['output']['bias']
    else:
      pooled = out['pooled']
      np.testing.assert_allclose(pooled, out['text_pooled'] * out['image_pooled'], rtol=1e-6)
      want = heads_lib.AnswerHead(info['num_answers'], pooled.shape[-1]).apply(
          {'params': head_params}, pooled)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_pooled_mlp_is_lxmert_answer_head_and_transfers_by_string():
  """The 'pooled_mlp' params are those of LXMERT's pretraining 'answer_head';
  transfer_answer_head copies the shared layers and the matched answers' columns."""
  pooled = jnp.ones((2, 8))
  old_answers, new_answers = ['yes', 'no', 'red', 'two'], ['blue', 'two', 'yes']
  old = heads_lib.AnswerHead(len(old_answers), 8).init(jax.random.PRNGKey(0), pooled)['params']
  fresh = heads_lib.AnswerHead(len(new_answers), 8).init(jax.random.PRNGKey(1), pooled)['params']
  params, matched = vqa.transfer_answer_head(old, fresh, old_answers, new_answers)
  assert matched == 2
  old, fresh = nn.meta.unbox(old), nn.meta.unbox(fresh)
  np.testing.assert_array_equal(params['hidden']['kernel'], old['hidden']['kernel'])
  np.testing.assert_array_equal(params['norm']['scale'], old['norm']['scale'])
  kernel = np.asarray(params['output']['kernel'])
  np.testing.assert_array_equal(kernel[:, 0], fresh['output']['kernel'][:, 0])  # blue: new
  np.testing.assert_array_equal(kernel[:, 1], old['output']['kernel'][:, 3])    # two
  np.testing.assert_array_equal(kernel[:, 2], old['output']['kernel'][:, 0])    # yes
  np.testing.assert_array_equal(params['output']['bias'][1], old['output']['bias'][3])
  assert jax.tree.structure(params) == jax.tree.structure(fresh)


def test_heads_table_and_config():
  assert vqa.HEADS == {'visualbert': 'mask_slot', 'vilbert': 'pooled_mlp',
                       'lxmert': 'pooled_mlp', 'uniter': 'pooled_mlp'}
  assert vqa.resolve_head('visualbert') == 'mask_slot'
  assert vqa.resolve_head('visualbert', 'pooled_mlp') == 'pooled_mlp'
  assert vqa.resolve_loss('mask_slot') == 'kl' and vqa.resolve_loss('pooled_mlp') == 'bce'
  assert vqa.resolve_loss('mask_slot', 'bce') == 'bce'
  with pytest.raises(ValueError, match='vqa.head must be one of'):
    vqa.resolve_head('lxmert', 'cls')
  with pytest.raises(ValueError, match='vqa.loss must be one of'):
    vqa.resolve_loss('pooled_mlp', 'ce')
  config = vqa.default_vqa_config()
  assert config.head is None and config.loss is None
  config.head = 'mask_slot'  # placeholders take a string


# ----------------------------------------------------------------------------
# Losses.


def _np_bce(x, z):
  return np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))


def test_bce_loss_against_numpy():
  logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [100.0, -100.0, 1.0]], np.float32)
  scores = np.array([[1.0, 0.0, 0.3], [0.6, 0.9, 0.0], [1.0, 1.0, 1.0]], np.float32)
  weights = np.array([1.0, 1.0, 0.0], np.float32)  # row 2 is padding
  # By hand: -[z log s(x) + (1 - z) log(1 - s(x))], summed over answers (mean x A).
  sig = 1 / (1 + np.exp(-logits[:2].astype(np.float64)))
  by_hand = -(scores[:2] * np.log(sig) + (1 - scores[:2]) * np.log(1 - sig)).sum(-1)
  np.testing.assert_allclose(vqa.bce_per_example(logits, scores)[:2], by_hand, rtol=1e-5)
  want = by_hand.mean()  # padding counts 0 in sum and count
  np.testing.assert_allclose(vqa.bce_loss(logits, scores, weights), want, rtol=1e-5)
  np.testing.assert_allclose(vqa.vqa_loss('bce', logits, scores, weights), want, rtol=1e-5)
  # Averaged over batch and answers, times A:
  a = logits.shape[1]
  np.testing.assert_allclose(_np_bce(logits[:2], scores[:2]).mean() * a, want, rtol=1e-5)
  # Large logits stay finite (row 2 alone).
  assert np.isfinite(vqa.bce_loss(logits, scores, np.array([0, 0, 1.0]))).all()
  assert float(vqa.bce_loss(logits, scores, np.zeros(3))) == 0.0


def test_kl_loss_against_numpy():
  logits = np.array([[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0],
                     [0.0, 1.0, 2.0, 3.0]], np.float32)
  scores = np.array([[1.0, 0.3, 0.0, 0.0], [0.0, 0.0, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0],
                     [1.0, 0.0, 0.0, 0.0]], np.float32)
  weights = np.array([1.0, 1.0, 1.0, 0.0], np.float32)  # row 2 has no answers, row 3 is padding

  def by_hand(row):
    p = scores[row] / scores[row].sum()
    log_q = logits[row] - np.log(np.exp(logits[row].astype(np.float64)).sum())
    return sum(pi * (np.log(pi) - lq) for pi, lq in zip(p, log_q) if pi > 0)

  kl, has_target = map(np.asarray, vqa.kl_per_example(logits, scores))
  np.testing.assert_allclose(kl[[0, 1, 3]], [by_hand(0), by_hand(1), by_hand(3)], rtol=1e-5)
  np.testing.assert_array_equal(has_target, [1, 1, 0, 1])
  assert float(kl[2]) == 0.0
  want = (by_hand(0) + by_hand(1)) / 2  # rows 2 and 3 count 0, in sum and count
  np.testing.assert_allclose(vqa.kl_loss(logits, scores, weights), want, rtol=1e-5)
  np.testing.assert_allclose(vqa.vqa_loss('kl', logits, scores, weights), want, rtol=1e-5)
  # Target normalised: scaling the scores changes nothing.
  np.testing.assert_allclose(vqa.kl_loss(logits, 3 * scores, weights), want, rtol=1e-5)
  assert float(vqa.kl_loss(logits, scores, np.array([0, 0, 1.0, 0]))) == 0.0
  with pytest.raises(ValueError, match='vqa.loss'):
    vqa.vqa_loss('mse', logits, scores, weights)


# ----------------------------------------------------------------------------
# Examples.


def _tokenizer(data_config, max_len):
  return BertTokenizer(tables.vocab_file(data_config), max_len)


def test_mask_slot_survives_truncation(data_config):
  """[MASK] sits at answer_slot, before the final [SEP], however long the question."""
  for max_len in (6, 8, 20):
    tokenizer = _tokenizer(data_config, max_len)
    questions = ['how many red objects are there?', 'how many red objects are there',
                 'what colour is the large circle left of the small square?', 'yes?']
    batch = vqa.encode_questions(tokenizer, questions, append_mask_slot=True)
    rows = np.arange(len(questions))
    ids, slot = batch['input_ids'], batch['answer_slot']
    lengths = batch['text_mask'].sum(1)
    np.testing.assert_array_equal(ids[rows, slot], tokenizer.mask_id)
    np.testing.assert_array_equal(slot, lengths - 2)
    np.testing.assert_array_equal(ids[rows, lengths - 1], tokenizer.sep_id)
    np.testing.assert_array_equal(ids[:, 0], tokenizer.cls_id)
    question_mark = tokenizer.encode(['?'])['input_ids'][0, 1]
    np.testing.assert_array_equal(ids[rows, slot - 1], question_mark)  # one '?', added or not
    assert (ids == tokenizer.mask_id).sum() == len(questions)
    assert not batch['token_type_ids'].any()
    # Untruncated, the same as tokenising the text with its slot.
    untruncated = _tokenizer(data_config, 64)
    for row, question in enumerate(questions):
      full = question + (' [MASK]' if question.endswith('?') else '? [MASK]')
      want = untruncated.encode([full])['input_ids'][0]
      want_len = int((want != tokenizer.pad_id).sum())
      if want_len <= max_len:
        np.testing.assert_array_equal(ids[row], want[:max_len])
      else:  # truncated: the question's first words, then the slot
        kept = lengths[row] - 4  # [CLS], '?', [MASK], [SEP]
        np.testing.assert_array_equal(ids[row, 1:1 + kept], want[1:1 + kept])
  with pytest.raises(ValueError, match='no room'):
    vqa.encode_questions(_tokenizer(data_config, 3), ['what?'], append_mask_slot=True)


def test_examples_match_the_records(data_config, info):
  """Text, regions, soft-score targets and ids are those of the records asked for."""
  indices = np.array([5, 0, 13, 3])
  questions = vqa.open_questions(data_config, 'validation')
  records = questions.read(indices)
  for design in DESIGNS:
    head = vqa.HEADS[design]
    batch = examples_of(data_config, design, head, indices, split='validation',
                        max_text_len=8)
    assert batch['answer_scores'].shape == (len(indices), info['num_answers'])
    assert batch['answer_scores'].dtype == np.float32
    want = np.zeros_like(batch['answer_scores'])
    for row, record in enumerate(records):
      want[row, record['answer_labels']] = record['answer_scores']
    np.testing.assert_array_equal(batch['answer_scores'], want)
    np.testing.assert_array_equal(batch['has_answers'], 1.0)
    assert batch['question_id'].dtype == np.int64
    np.testing.assert_array_equal(batch['question_id'], [r['question_id'] for r in records])
    images = vqa.open_examples(data_config, design, split='validation')[0].images
    regions = examples_lib.region_batch(design, images,
                                        np.array([r['image_index'] for r in records]))
    for key in vqa.REGION_KEYS:
      np.testing.assert_array_equal(batch[key], regions[key])
    tokenizer = _tokenizer(data_config, 8)
    texts = [r['question'].decode() for r in records]
    if head == 'pooled_mlp':
      np.testing.assert_array_equal(batch['input_ids'], tokenizer.encode(texts)['input_ids'])
      np.testing.assert_array_equal(batch['answer_slot'], 0)
    else:
      np.testing.assert_array_equal(
          batch['input_ids'][np.arange(len(indices)), batch['answer_slot']], tokenizer.mask_id)
  assert set(batch) == {'input_ids', 'text_mask', 'token_type_ids', 'answer_slot',
                        *vqa.REGION_KEYS, 'answer_scores', 'has_answers', 'question_id'}


def test_answer_targets_without_answers_and_remapped():
  """Test questions (no answers) get zeros and has_answers 0; a label map moves
  scores to the model vocabulary's labels and drops answers it lacks."""
  records = [dict(question_id=1, answer_labels=np.array([0, 2], np.int32),
                  answer_scores=np.array([1.0, 0.3], np.float32)),
             dict(question_id=2, answer_labels=np.array([], np.int32),
                  answer_scores=np.array([], np.float32))]
  targets = vqa.answer_targets(records, 3)
  np.testing.assert_array_equal(targets['answer_scores'],
                                np.array([[1.0, 0, 0.3], [0, 0, 0]], np.float32))
  np.testing.assert_array_equal(targets['has_answers'], [1, 0])
  label_map = vqa.answer_label_map(['yes', 'no', 'red'], ['red', 'blue', 'yes', 'two'])
  np.testing.assert_array_equal(label_map, [2, -1, 0])
  targets = vqa.answer_targets(records, 4, label_map)
  np.testing.assert_array_equal(targets['answer_scores'],
                                np.array([[0.3, 0, 1.0, 0], [0, 0, 0, 0]], np.float32))
  with pytest.raises(ValueError, match='outside'):
    vqa.answer_targets(records, 2)


# ----------------------------------------------------------------------------
# Training iterator.


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_iterator_resumes_exactly(data_config, info):
  def make(**kwargs):
    return vqa.make_question_iterator(data_config, 'visualbert', global_batch_size=8, seed=3,
                                   **kwargs)

  iterator = make()
  first = _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # JSON-serialisable
  expected = _take(iterator, 2)
  resumed = make()
  resumed.set_state(state)
  for got, want in zip(_take(resumed, 2), expected):
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  batch = first[0]
  assert 'question_id' not in batch
  assert batch['input_ids'].shape == (8, data_config.max_text_len)
  assert batch['answer_scores'].shape == (8, info['num_answers'])
  np.testing.assert_array_equal(batch['input_ids'][np.arange(8), batch['answer_slot']],
                                _tokenizer(data_config, 8).mask_id)
  # 72 training questions, 9 batches an epoch: two epochs are two orders of them all.
  num_questions = len(vqa.open_questions(data_config, 'train'))
  epoch = num_questions // 8
  fresh = make()
  rows = [b['input_ids'] for b in _take(fresh, 2 * epoch)]
  one, two = np.concatenate(rows[:epoch]), np.concatenate(rows[epoch:])
  assert sorted(map(bytes, one)) == sorted(map(bytes, two))
  assert not np.array_equal(one, two)  # reshuffled
  with pytest.raises(ValueError, match='different pipeline'):
    make(head='pooled_mlp').set_state(state)


def test_train_iterator_global_arrays(data_config):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ('data',))
  iterator = vqa.make_question_iterator(data_config, 'lxmert', global_batch_size=8, seed=0,
                                     mesh=mesh)
  batch = next(iterator)
  assert isinstance(batch['answer_scores'], jax.Array)
  assert batch['answer_scores'].sharding.spec == jax.sharding.PartitionSpec(('data',))
  np.testing.assert_array_equal(batch['answer_slot'], 0)


# ----------------------------------------------------------------------------
# Answer vocabularies.


def test_read_answer_vocab_formats_and_errors(tmp_path):
  text = tmp_path / 'answers.txt'
  text.write_text('yes\nno\n2\n')
  assert vqa.read_answer_vocab(str(text)) == ['yes', 'no', '2']
  ans2label = tmp_path / 'trainval_ans2label.json'
  ans2label.write_text(json.dumps({'': 0, 'no': 2, 'yes': 1}))
  assert vqa.read_answer_vocab(str(ans2label)) == ['', 'yes', 'no']
  label2ans = tmp_path / 'trainval_label2ans.json'
  label2ans.write_text(json.dumps(['', 'yes', 'no']))
  assert vqa.read_answer_vocab(str(label2ans)) == ['', 'yes', 'no']

  missing = tmp_path / 'missing.txt'
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    vqa.read_answer_vocab(str(missing))
  duplicate = tmp_path / 'dup.txt'
  duplicate.write_text('yes\nno\nyes\n')
  with pytest.raises(ValueError,
                     match=r"dup.txt: line 3: duplicate answer 'yes' \(first at line 1"):
    vqa.read_answer_vocab(str(duplicate))
  broken = tmp_path / 'broken.json'
  broken.write_text('{"yes": 0,')
  with pytest.raises(ValueError, match='broken.json: not valid JSON'):
    vqa.read_answer_vocab(str(broken))
  gap = tmp_path / 'gap.json'
  gap.write_text(json.dumps({'yes': 0, 'no': 2}))
  with pytest.raises(ValueError, match=r"gap.json: answer 'no' has index 2"):
    vqa.read_answer_vocab(str(gap))
  clash = tmp_path / 'clash.json'
  clash.write_text(json.dumps({'yes': 0, 'no': 0}))
  with pytest.raises(ValueError, match='clash.json: index 0 is given to both'):
    vqa.read_answer_vocab(str(clash))
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  with pytest.raises(ValueError, match='empty.txt: no answers'):
    vqa.read_answer_vocab(str(empty))
  number = tmp_path / 'number.json'
  number.write_text('3')
  with pytest.raises(ValueError, match='number.json: expected a JSON object'):
    vqa.read_answer_vocab(str(number))


def test_answer_vocab_file_remaps_the_table(data_config, tmp_path):
  """A user vocabulary (other order, some answers missing) gets the scores by string."""
  table_answers = tables.answer_vocab(data_config)
  own = list(reversed(table_answers[:-3]))
  path = tmp_path / 'ans2label.json'
  path.write_text(json.dumps({a: i for i, a in enumerate(own)}))
  plain, _ = vqa.open_examples(data_config, 'lxmert', split='train')
  mapped, answers = vqa.open_examples(data_config, 'lxmert', split='train',
                                      answer_vocab_file=str(path))
  assert answers == own
  indices = np.arange(16)
  want, got = plain.examples(indices)['answer_scores'], mapped.examples(indices)['answer_scores']
  assert got.shape == (16, len(own))
  for j, answer in enumerate(own):
    np.testing.assert_array_equal(got[:, j], want[:, table_answers.index(answer)])


# ----------------------------------------------------------------------------
# Evaluation.


def test_prediction_helpers():
  logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
  np.testing.assert_array_equal(vqa.predict(logits), [1, 0])
  assert vqa.predict(logits).dtype == jnp.int32
  strings = vqa.answer_strings(np.array([1, 0]), ['no', 'yes', 'red'])
  assert strings == ['yes', 'no']
  with pytest.raises(ValueError, match='outside the vocabulary'):
    vqa.answer_strings([3], ['no', 'yes', 'red'])
  records = vqa.prediction_records(np.array([10, 11], np.int64), strings)
  assert records == [{'question_id': 10, 'answer': 'yes'}, {'question_id': 11, 'answer': 'no'}]
  assert all(isinstance(r['question_id'], int) for r in records)  # not np.int64
  json.dumps(records)
  assert vqa.derive_answer_type(['yes'] * 6 + ['no'] * 4) == 'yes/no'
  assert vqa.derive_answer_type(['Yes'] * 6 + ['2'] * 4) == 'yes/no'
  assert vqa.derive_answer_type(['two'] * 5 + ['red'] * 4 + ['2']) == 'number'
  assert vqa.derive_answer_type(['red', 'red', '3']) == 'other'
  np.testing.assert_allclose(
      vqa.soft_score_accuracy(jnp.array([0, 2]), jnp.array([[0.3, 1.0, 0], [0, 0, 0.6]]),
                              jnp.array([1.0, 0.0])), (0.3, 1.0))


def test_official_accuracy_of_the_best_soft_answer(data_config):
  """On the world's validation split (clean answers), the official accuracy of
  predicting each question's best soft-scored answer is the mean of those scores,
  per answer type; padded rows and unanswered questions are left out."""
  table = vqa.open_questions(data_config, 'validation', with_ground_truth=True)
  truth = vqa.read_ground_truth(table)
  examples, answers = vqa.open_examples(data_config, 'uniter', split='validation')
  batch = examples.examples(np.arange(len(examples)))
  best = np.asarray(vqa.predict(jnp.asarray(batch['answer_scores'])))
  predicted = vqa.answer_strings(best, answers)
  mask = np.ones(len(best), bool)
  mask[-2:] = False  # as padding
  stats = vqa.accuracy_stats(batch['question_id'], predicted, truth, mask)
  score = batch['answer_scores'][np.arange(len(best)), best]
  summary = vqa_accuracy.summary(stats)
  assert summary['count'] == len(best) - 2
  np.testing.assert_allclose(summary['accuracy'], score[mask].mean(), rtol=1e-6)
  total, count = vqa.soft_score_accuracy(jnp.asarray(best), jnp.asarray(batch['answer_scores']),
                                         jnp.asarray(mask, jnp.float32))
  np.testing.assert_allclose(summary['accuracy'], total / count, rtol=1e-6)
  types = np.array([truth[int(q)].answer_type for q in batch['question_id']])
  for answer_type in vqa_accuracy.ANSWER_TYPES:
    rows = mask & (types == answer_type)
    key = answer_type.replace('/', '_')
    assert summary[f'count_{key}'] == rows.sum()
    if rows.any():
      np.testing.assert_allclose(summary[f'accuracy_{key}'], score[rows].mean(), rtol=1e-6)
  assert summary['count_yes_no'] and summary['count_number'] and summary['count_other']
  # A question with no ground truth (a test split) is skipped; an unknown one is an error.
  truth[-1] = vqa.GroundTruth((), None)
  assert vqa_accuracy.summary(vqa.accuracy_stats([-1], ['yes'], truth))['count'] == 0
  with pytest.raises(KeyError, match='question 123456'):
    vqa.accuracy_stats([123456], ['yes'], truth)
