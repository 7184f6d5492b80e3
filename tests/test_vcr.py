"""The VCR task (`vlpjax.tasks.vcr`): the vcr table builder on r2c's jsonl
files (fixtures written here), the references of both kinds, each design's
sequence layout, the accuracies against hand-computed cases, the leaderboard
CSV, the heads, two processes, and short fine-tunes on the tiny world (8 CPU
devices) whose evaluators score every example once on splits the eval batch
does not divide."""
import importlib
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import evaluator_worker
import task_testing as tt
from test_finetune import tiny_config
import vlpjax
from vlpjax.data import annotations_builder as ab
from vlpjax.data import formats, vlp_world
from vlpjax.data import world as world_lib
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.evaluators import common
from vlpjax.models import layers
from vlpjax.tasks import TASKS, get_task, vcr

pytestmark = pytest.mark.usefixtures('compile_cache')
# A multiple of the 8 devices that divides neither the tiny world's validation
# and test splits (12 examples each) nor its train split (72).
EVAL_BATCH = 16

# ----------------------------------------------------------------------------
# The builder, on tiny files in r2c's jsonl format.

IMAGES = ('lsmdc_3015_CHARLIE_ST_CLOUD/3015_CHARLIE_ST_CLOUD_00.23.57.935-00.24.00.783@0.jpg',
          'movieclips_A_Fistful_of_Dollars/fS1PRo0lkm0@13.jpg',
          'lsmdc_1054_Harry_Potter_and_the_prisoner_of_azkaban/1054_00.41.53.620@2.jpg')


def vcr_line(split, number, image, objects, question, answers, rationales, answer_label,
             rationale_label):
  """One line of VCR's jsonl, with the fields the builder reads and some it does not."""
  entry = dict(movie=image.split('/')[0], objects=objects, interesting_scores=[0],
               answer_likelihood='possible', img_fn=image,
               metadata_fn=image.replace('.jpg', '.json'), question=question,
               answer_choices=answers, rationale_choices=rationales,
               answer_match_iter=[3, 0, 2, 1], img_id=f'{split}-{number}',
               question_number=0, annot_id=f'{split}-{number}', match_fold=f'{split}-0')
  if answer_label is not None:
    entry.update(answer_label=answer_label, rationale_label=rationale_label)
  return json.dumps(entry)


def example_lines(split, labelled=True):
  """Two examples about images 0 and 1 (three about 2 in train)."""
  person_car = ['person', 'person', 'car']
  first = vcr_line(
      split, 0, IMAGES[0], person_car, ['Does', [1], 'feel', 'comfortable', '?'],
      [['No', 'she', 'does', 'not', '.'], ['Yes', ',', [0, 1], 'are', 'cold', '.'],
       ['Yes', 'she', 'is', '.'], [[2], 'is', 'warm', '.']],
      [['She', 'looks', 'tense', '.'], [[0], 'is', 'smiling', '.'], ['It', 'is', 'snowing', '.'],
       [[1], 'frowns', '.']], 0 if labelled else None, 3)
  second = vcr_line(
      split, 1, IMAGES[1], ['horse'], ['Why', 'is', [0], 'running', '?'],
      [['It', 'is', 'scared', '.'], ['It', 'is', 'racing', '.'], ['It', 'is', 'hungry', '.'],
       ['It', 'is', 'lost', '.']],
      [['A', 'gun', 'fired', '.'], ['There', 'is', 'a', 'track', '.'],
       ['It', 'sees', 'food', '.'], ['Nobody', 'rides', 'it', '.']], 1 if labelled else None, 1)
  return [first, second]


def write_vcr(root, lines_of=None):
  """train.jsonl, val.jsonl and test.jsonl (no labels) in `root`."""
  lines_of = lines_of or {'train': example_lines('train'), 'validation': example_lines('val'),
                          'test': example_lines('test', labelled=False)}
  for split, lines in lines_of.items():
    (root / ab.Vcr.DEFAULT_FILES[split]).write_text(''.join(line + '\n' for line in lines))


def build_vcr(root, config, *args):
  """`python -m vlpjax.data.annotations_builder vcr` against lxmert_tsv/vcr_gt."""
  tt.build_table('vcr', 'lxmert_tsv/vcr_gt', root, config, *args)


@pytest.fixture(scope='module')
def vcr_root(tmp_path_factory):
  """An LXMERT-TSV images table of the examples' images and the jsonl files."""
  root = tmp_path_factory.mktemp('vcr')
  tt.build_lxmert_images(root, 'vcr_gt', {'vcr_gt_obj.tsv': IMAGES})
  write_vcr(root)
  return root


def test_builder_reads_r2c_jsonl(vcr_root):
  build_vcr(vcr_root, 'tiny')
  for split, labelled in (('train', True), ('validation', True), ('test', False)):
    rows = tt.read_split(vcr_root, 'vcr/tiny', split)
    lines = [json.loads(line) for line in example_lines('train')]
    assert [r['annot_id'].decode() for r in rows] == [
        f'{"val" if split == "validation" else split}-{k}' for k in range(2)]
    for row, line, image_row in zip(rows, lines, (0, 1)):
      assert row['image_index'] == image_row and row['image_id'].decode() == IMAGES[image_row]
      for field in world_lib.VCR_JSON_FIELDS:
        assert json.loads(row[field].decode()) == line[field], field
      if labelled:
        assert (row['answer_label'], row['rationale_label']) == (
            line['answer_label'], line['rationale_label'])
      else:  # VCR's test file has no labels
        assert (row['answer_label'], row['rationale_label']) == (-1, -1)


def test_builder_errors_name_the_file_line_and_annot_id(vcr_root, tmp_path):
  args = ['--images_data_dir', str(vcr_root / 'data'), '--splits', 'train', 'validation']
  good = example_lines('val')
  out_of_range = good[1].replace('["Why", "is", [0]', '["Why", "is", [1]')
  write_vcr(tmp_path, {'train': example_lines('train'), 'validation': [good[0], out_of_range]})
  with pytest.raises(formats.FormatError, match=r"val\.jsonl: line 2: annot_id val-1: question: "
                     r"object reference \[1\] is out of range of the 1 objects"):
    build_vcr(tmp_path, 'errors', *args)
  three_answers = json.loads(good[1])
  three_answers['answer_choices'] = three_answers['answer_choices'][:3]
  bad_label = json.loads(good[1])
  bad_label.update(annot_id='val-5', answer_label=4)
  missing_image = json.loads(good[1])
  missing_image.update(annot_id='val-6', img_fn='lsmdc_nowhere/nothing@0.jpg')
  no_label = json.loads(good[1])
  no_label.update(annot_id='val-7')
  del no_label['rationale_label']
  lines = [good[0], out_of_range, json.dumps(three_answers), json.dumps(bad_label),
           json.dumps(missing_image), '{"annot_id": ', json.dumps(no_label), good[0]]
  write_vcr(tmp_path, {'train': example_lines('train'), 'validation': lines})
  build_vcr(tmp_path, 'errors', *args, '--on_error', 'skip')
  rows = tt.read_split(tmp_path, 'vcr/errors', 'validation')
  assert [r['annot_id'] for r in rows] == [b'val-0']
  report = tt.build_report(tmp_path, 'vcr/errors')
  assert report['by_reason'] == {'bad reference': 1, 'bad choices': 1, 'bad label': 1,
                                 'missing image': 1, 'malformed line': 1, 'missing field': 1,
                                 'duplicate example': 1}
  where = {s['kind']: s['where'] for s in report['skipped']}
  assert where['bad label'].endswith('val.jsonl: line 4: annot_id val-5')
  assert where['missing image'].endswith('val.jsonl: line 5: annot_id val-6')
  assert where['duplicate example'].endswith('val.jsonl: line 8: annot_id val-0')


# ----------------------------------------------------------------------------
# References and sequences.


def test_names_references_as_r2c():
  objects = ['person', 'car', 'person'] + ['person'] * 9
  rendered = vcr.render_references(['Is', [0], 'in', [1], '?', [0, 2], [10], [11]], objects,
                                   'names', 0)
  # Persons get r2c's names by index (10 is its second 'Peyton'), other objects
  # their class; several indices joined with 'and'.
  assert rendered == ['Is', 'Casey', 'in', 'car', '?', 'Casey and Jessie', 'Peyton', 'Skyler']
  assert vcr.object_name(['person'] * 16, 15) == 'Casey'
  with pytest.raises(ValueError, match=r'object reference \[3\] is out of range of the 3'):
    vcr.render_references([[3]], objects[:3], 'names', 0)


def test_region_token_references_as_uniter():
  rendered = vcr.render_references(['Is', [0], 'near', [2, 1], '?'], ['person', 'car', 'dog'],
                                   'region_tokens', 1000)
  assert rendered == ['Is', 1000, 'near', 1002, 1001, '?']
  with pytest.raises(ValueError, match='region tokens go up to 80'):
    vcr.render_references([[81]], ['person'] * 82, 'region_tokens', 1000)


@pytest.fixture(scope='module')
def tokenizer(data_config):
  from vlpjax.data import tables  # pylint: disable=g-import-not-at-top
  return BertTokenizer(tables.vocab_file(data_config), 40)


def word_pieces(tokenizer, text):
  encoded = tokenizer.encode([text])
  return encoded['input_ids'][0, 1:encoded['text_mask'][0].sum() - 1].tolist()


EXAMPLE = vcr.Example('val-0', ['what', 'color', 'is', [1], '?'],
                      [[[1], 'is', c] for c in ('red', 'blue', 'pink', 'cyan')],
                      [[[1], 'is', 'the', c, 'ring', 'above', [0]]
                       for c in ('red', 'blue', 'pink', 'cyan')], ['circle', 'ring'], 0, 1)


def test_uniter_layout_types_and_region_tokens(tokenizer):
  encoder = vcr.TextEncoder(tokenizer, 'region_tokens', vcr.LAYOUTS['uniter'], 500)
  pieces = encoder.piece_ids(EXAMPLE)
  question, answers, rationales = pieces['question'], pieces['answers'], pieces['rationales']
  assert question[-2] == 501 and answers[2][0] == 501 and rationales[3][-1] == 500
  cls, sep = tokenizer.cls_id, tokenizer.sep_id
  ids, types = encoder.sequence(encoder.answer_parts(pieces)[2])
  # [CLS] question [SEP] answer [SEP]: 0 question, 2 answer (each [SEP] the next part's).
  assert ids == [cls, *question, sep, *answers[2], sep]
  assert types == [0] * (1 + len(question)) + [2] * (len(answers[2]) + 2)
  ids, types = encoder.sequence(encoder.rationale_parts(pieces, 1)[3])
  # ... [SEP] gold answer [SEP] rationale [SEP]: 2 the answer, 3 the rationale.
  assert ids == [cls, *question, sep, *answers[1], sep, *rationales[3], sep]
  assert types == ([0] * (1 + len(question)) + [2] * (1 + len(answers[1]))
                   + [3] * (len(rationales[3]) + 2))


@pytest.mark.parametrize('design,separated', [('vilbert', True), ('visualbert', False)])
def test_bert_layouts_are_text_a_text_b(tokenizer, design, separated):
  encoder = vcr.TextEncoder(tokenizer, 'names', vcr.LAYOUTS[design], 500)
  pieces = encoder.piece_ids(EXAMPLE)
  ids, types = encoder.sequence(encoder.rationale_parts(pieces, 0)[1])
  # 'names' references: the objects' class names (no person here).
  assert pieces['question'] == word_pieces(tokenizer, 'what color is ring ?')
  assert pieces['rationales'][1] == word_pieces(tokenizer, 'ring is the blue ring above circle')
  cls, sep = tokenizer.cls_id, tokenizer.sep_id
  # ViLBERT: question [SEP] gold answer; VisualBERT (r2c): no [SEP] between them.
  context = [cls, *pieces['question'], *[sep] * separated, *pieces['answers'][0], sep]
  assert ids == context + pieces['rationales'][1] + [sep]
  assert types == [0] * len(context) + [1] * (len(pieces['rationales'][1]) + 1)


def test_truncation_cuts_the_longest_part_first(tokenizer):
  short = BertTokenizer(tokenizer.vocab_file, 12)
  encoder = vcr.TextEncoder(short, 'names', vcr.LAYOUTS['vilbert'], 500)
  parts = [([10] * 3, 0, False), ([11] * 9, 1, True)]
  ids, types = encoder.sequence(parts)
  # 12 = [CLS] + 3 + [SEP] + 6 + [SEP]: the candidate (the longer) lost 3.
  assert ids == [short.cls_id, 10, 10, 10, short.sep_id] + [11] * 6 + [short.sep_id]
  assert types == [0] * 5 + [1] * 7


# ----------------------------------------------------------------------------
# Metrics and the prediction file.


def test_accuracies_by_hand():
  # Example 0: answer right (2), rationale given the gold answer right (1).
  # Example 1: answer wrong, rationale right: Q->AR wrong.
  # Example 2: answer right, the rationale given the gold answer wrong (a
  #   rationale given another answer would be right: it does not count).
  # Example 3: no labels (VCR's test): scored, not counted in the accuracies.
  answer_scores = np.array([[0, 0, 5, 1], [3, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], float)
  rationale_scores = np.zeros((4, 4, 4))
  rationale_scores[0, 2, 1] = 1
  rationale_scores[1, 3, 0] = 1
  rationale_scores[2, 1, 2] = 1
  rationale_scores[2, 0, 3] = 1
  answer_label, rationale_label = [2, 3, 1, -1], [1, 0, 3, -1]
  stats = vcr.choice_stats(answer_scores, rationale_scores, answer_label, rationale_label)
  assert stats == {'qa_correct': 2, 'qar_correct': 2, 'q_ar_correct': 1, 'labelled': 3,
                   'count': 4}
  assert all(v.dtype == np.int64 for v in stats.values())
  assert vcr.summary(stats) == {'qa_accuracy': 2 / 3, 'qar_accuracy': 2 / 3,
                                'q_ar_accuracy': 1 / 3, 'count': 4}
  # Statistics of two halves (two processes) add up to the whole's.
  halves = [vcr.choice_stats(answer_scores[s], rationale_scores[s], answer_label[s],
                             rationale_label[s]) for s in (slice(0, 1), slice(1, None))]
  merged = vcr.merge_stats(vcr.merge_stats(vcr.zero_stats(), halves[0]), halves[1])
  assert merged == stats
  unlabelled = vcr.summary(vcr.choice_stats(answer_scores[3:], rationale_scores[3:], [-1], [-1]))
  assert math.isnan(unlabelled['qa_accuracy']) and unlabelled['count'] == 1


def test_leaderboard_csv(tmp_path):
  scores = np.zeros((2, 20))
  scores[0, 1] = math.log(3)      # answers 1 : 1 : 1 : 1 -> 3 : 1 : 1 : 1
  scores[1, 4 + 4 * 2 + 3] = 10   # rationale 3 given answer 2
  probs = vcr.probabilities(scores)
  assert probs.shape == (2, 5, 4)
  np.testing.assert_allclose(probs.sum(-1), 1)
  np.testing.assert_allclose(probs[0, 0], [1 / 6, 1 / 2, 1 / 6, 1 / 6])
  records = vcr.prediction_records(['val-1', 'val-0'], probs[::-1])
  path = tmp_path / 'vcr_val_step4.csv'
  common.write_prediction_parts(path, [dict(r, _index=i) for r, i in zip(records, (1, 0))],
                                render=vcr.csv_text)
  assert os.listdir(tmp_path) == [path.name]
  lines = path.read_text().splitlines()
  # r2c's eval_for_leaderboard.py columns: answer_i, then rationale_conditioned_on_a<a>_<i>.
  assert lines[0] == 'annot_id,' + ','.join(
      [f'answer_{i}' for i in range(4)]
      + [f'rationale_conditioned_on_a{a}_{i}' for a in range(4) for i in range(4)])
  rows = [line.split(',') for line in lines[1:]]
  assert [r[0] for r in rows] == ['val-0', 'val-1']
  np.testing.assert_allclose(np.array([r[1:] for r in rows], float), probs.reshape(2, 20))


def test_two_processes_count_every_example_once(tmp_path):
  path = tmp_path / 'vcr_val.csv'
  results = evaluator_worker.run_two_processes([path], mode='vcr')
  # 37 examples in batches of 16 (the last padded); process p builds rows [8p, 8p + 8).
  assert results[0]['seen'] == [*range(0, 8), *range(16, 24), *range(32, 37)]
  assert results[1]['seen'] == [*range(8, 16), *range(24, 32)]
  # 36 labelled: answers wrong at the 8 multiples of 5, rationales at the 6 of
  # 7 (0 and 35 both): 28, 30 and 24 right.
  for result in results:
    assert result['summary'] == {'qa_accuracy': 28 / 36, 'qar_accuracy': 30 / 36,
                                 'q_ar_accuracy': 24 / 36, 'count': 37}
  lines = path.read_text().splitlines()
  assert [line.split(',')[0] for line in lines[1:]] == [f'val-{i}' for i in range(37)]
  for i, line in enumerate(lines[1:]):
    scores, _, _ = evaluator_worker.vcr_scores(i)
    np.testing.assert_allclose([float(x) for x in line.split(',')[1:]],
                               vcr.probabilities(scores[None]).reshape(-1))


# ----------------------------------------------------------------------------
# The embedded world's table and examples.


def test_world_examples_refer_to_the_gt_regions(data_config):
  rows = world_lib.make_world(vlp_world.WORLD_SIZES['tiny']).vcr['validation']
  config = tiny_config('uniter', data_config.data_dir, 'vcr')
  examples = vcr.open_examples(config, 'validation', evaluation=True)
  assert len(examples) == len(rows) and len(examples) % EVAL_BATCH
  batch = examples.examples(np.arange(3))
  assert batch['input_ids'].shape == (3, vcr.EVAL_SEQUENCES, config.data.max_text_len)
  np.testing.assert_array_equal(batch['answer_label'], [r['answer_label'] for r in rows[:3]])
  gt = tfds.data_source('vlp_world/tiny_gt_images', data_dir=data_config.data_dir)['train']
  for row, mask, feats in zip(rows, batch['region_mask'], batch['region_feats']):
    image = gt[row['image_index']]
    # Region k is object k: every object of the scene, in object order.
    assert mask.sum() == image['num_boxes'] == len(json.loads(row['objects']))
    np.testing.assert_array_equal(feats[:mask.sum()], image['features'])
  # UNITER's references are region tokens past the model's (padded) word table.
  rows_of_table = layers.padded_vocab_size(config.model.vocab_size)
  references = set(batch['input_ids'][batch['input_ids'] >= config.model.vocab_size].tolist())
  assert references and references <= set(rows_of_table + np.arange(7))
  train = vcr.open_examples(config, 'train', evaluation=False)
  assert len(train) == 2 * len(world_lib.make_world(vlp_world.WORLD_SIZES['tiny']).vcr['train'])
  batch = train.examples(np.arange(4))  # rows 0, 0, 1, 1 at stages Q->A, QA->R
  train_rows = world_lib.make_world(vlp_world.WORLD_SIZES['tiny']).vcr['train']
  np.testing.assert_array_equal(batch['label'], [
      train_rows[0]['answer_label'], train_rows[0]['rationale_label'],
      train_rows[1]['answer_label'], train_rows[1]['rationale_label']])
  assert (batch['token_type_ids'][1] == 3).any() and not (batch['token_type_ids'][0] == 3).any()


# ----------------------------------------------------------------------------
# Heads and configs.


@pytest.mark.parametrize('design', [
    'uniter', pytest.param('vilbert', marks=pytest.mark.slow),
    pytest.param('lxmert', marks=pytest.mark.slow),
    pytest.param('visualbert', marks=pytest.mark.slow)])
def test_heads_and_extra_rows(design):
  config = importlib.import_module(f'configs.{design}').get_config('tiny,task=vcr')
  model = vcr.make_model(config)
  b, c, t, r, f = 2, 4, 6, 3, config.model.feature_dim
  loc = vcr.get_design(design).loc_dim
  rng = np.random.default_rng(0)
  types = np.zeros((b, c, t), np.int32)
  types[:, :, 3:] = vcr.LAYOUTS[design].rationale_type
  batch = dict(input_ids=rng.integers(5, 50, (b, c, t)).astype(np.int32),
               text_mask=np.ones((b, c, t), np.int32), token_type_ids=types,
               region_feats=rng.normal(size=(b, r, f)).astype(np.float32),
               region_loc=rng.uniform(size=(b, r, loc)).astype(np.float32),
               region_mask=np.ones((b, r), np.int32))
  if vcr.resolve_references(design) == 'region_tokens':
    batch['input_ids'][:, :, 1] = config.model.vocab_size + np.arange(c)  # region tokens 0-3
  params = jax.jit(model.init)(jax.random.key(0), **batch)['params']
  outputs = model.apply({'params': params}, **batch)
  width = 2 if vcr.resolve_head(design) == 'pair_mlp' else 1
  assert outputs['logits'].shape == (b, c, width) and outputs['scores'].shape == (b, c)
  np.testing.assert_array_equal(outputs['scores'], outputs['logits'][..., -1])
  # Each candidate is scored on its own sequence: another candidate changes nothing.
  changed = dict(batch, input_ids=batch['input_ids'].copy())
  changed['input_ids'][:, 3, 2] += 1
  again = model.apply({'params': params}, **changed)['scores']
  np.testing.assert_allclose(again[:, :3], outputs['scores'][:, :3], rtol=1e-5, atol=1e-6)
  assert not np.allclose(again[:, 3], outputs['scores'][:, 3])
  params = nn.meta.unbox(params)
  embeddings = params['backbone']['embeddings']
  # The backbone keeps its tables (pretrained checkpoints load as they are).
  assert embeddings['word_embeddings']['embedding'].shape[0] == layers.padded_vocab_size(
      config.model.vocab_size)
  assert embeddings['token_type_embeddings']['embedding'].shape[0] == 2
  if design == 'uniter':
    assert params[vcr.EXTRA_WORDS_NAME].shape == (vcr.NUM_REGION_TOKENS, config.model.hidden_size)
    assert params[vcr.EXTRA_TYPES_NAME].shape == (2, config.model.hidden_size)
    # Types 2 and 3 start as copies of row 0 after init.source (init_type_embedding).
    config.init.source = 'workdir:/somewhere'
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params)
    started = vcr.init_heads(config, params, abstract)
    for row in started[vcr.EXTRA_TYPES_NAME]:
      np.testing.assert_array_equal(row, embeddings['token_type_embeddings']['embedding'][0])
    np.testing.assert_array_equal(started[vcr.EXTRA_WORDS_NAME], params[vcr.EXTRA_WORDS_NAME])
  else:
    assert vcr.EXTRA_WORDS_NAME not in params and vcr.EXTRA_TYPES_NAME not in params


def test_losses_by_hand():
  config = importlib.import_module('configs.uniter').get_config('tiny,task=vcr')
  logits = jnp.array([[[0.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
  outputs = {'logits': logits, 'scores': logits[..., -1]}
  loss, metrics = vcr.compute_losses(config, outputs, {'label': jnp.array([0])}, 'vcr')
  # UNITER: CE over each sequence's 2 logits, target 1 on the right one, mean of 4.
  ce = lambda right, other: -math.log(math.exp(right) / (math.exp(right) + math.exp(other)))
  assert loss == pytest.approx((ce(1, 0) + ce(0, 0) + ce(2, 0) + ce(0, 0)) / 4, rel=1e-6)
  assert metrics['train_accuracy'] == 1.0
  config = importlib.import_module('configs.vilbert').get_config('tiny,task=vcr')
  scores = jnp.array([[0.0, math.log(3.0), 0.0, 0.0]])
  loss, _ = vcr.compute_losses(config, {'logits': scores[..., None], 'scores': scores},
                               {'label': jnp.array([1])}, 'vcr')
  assert loss == pytest.approx(-math.log(3 / 6), rel=1e-6)  # softmax CE over the 4


def test_config_recipes_and_evaluators(data_config):
  assert 'vcr' in TASKS and get_task('vcr') is vcr
  uniter = importlib.import_module('configs.uniter').get_config('base,task=vcr')
  assert (uniter.train.learning_rate, uniter.train.num_steps, uniter.train.adam_b2) == (
      6e-5, 8_000, 0.98)
  assert uniter.train.warmup_fraction == pytest.approx(0.1)
  assert uniter.data.max_text_len == 220
  assert {k: (v.type, v.split, v.batch_size) for k, v in uniter.evals.items()} == {
      'vcr_val': ('vcr', 'validation', vcr.EVAL_BATCH), 'vcr_test': ('vcr', 'test', vcr.EVAL_BATCH)}
  vilbert = importlib.import_module('configs.vilbert').get_config('base,task=vcr')
  assert vilbert.train.learning_rate == 4e-5  # its VQA recipe
  small = importlib.import_module('configs.visualbert').get_config('small,task=vcr')
  assert small.data.max_text_len == vcr.WORLD_TEXT_LENGTH
  assert small.evals.vcr_val.log_steps == 200
  with pytest.raises(ValueError, match='vcr.head must be one of'):
    vcr.resolve_head('visualbert', 'pooled_mlp')
  tiny = tiny_config('visualbert', data_config.data_dir, 'vcr')
  tiny.vcr.references = 'region_tokens'
  with pytest.raises(ValueError, match="visualbert: .*need a backbone that takes "
                     "extra_word_embeddings"):
    vcr.prepare(tiny)
  small.evals = ml_collections.ConfigDict({'v': dict(small.evals.vcr_val, type='vqa')})
  with pytest.raises(ValueError, match="the vcr task has evaluators of type 'vcr'"):
    vcr.make_evaluators(small, None, None, '')


# ----------------------------------------------------------------------------
# Fine-tuning from the command line's config, end to end.


def finetune(design, data_dir, workdir, num_steps=4, references=None):
  """`configs/<design>.py:tiny,task=vcr` on the tiny world, evaluated every 2
  steps on validation and at the end on test and train, in batches of
  EVAL_BATCH: (the run's config, its last metrics, its metrics.jsonl records)."""
  config = tiny_config(design, data_dir, 'vcr')
  config.vcr.references = references
  config.evals.vcr_train = dict(config.evals.vcr_test, split='train')
  return tt.finetune(config, workdir, num_steps, EVAL_BATCH)


def csv_rows(workdir, name, step):
  with open(os.path.join(workdir, 'predictions', f'{name}_step{step}.csv'),
            encoding='utf-8') as f:
    lines = f.read().splitlines()
  return [(line.split(',')[0], np.array(line.split(',')[1:], float)) for line in lines[1:]]


def check_evaluations(config, records, workdir, step):
  world_rows = world_lib.make_world(vlp_world.WORLD_SIZES['tiny']).vcr
  for name in ('vcr_val', 'vcr_test', 'vcr_train'):
    rows = world_rows[config.evals[name].split]
    assert len(rows) % EVAL_BATCH
    logged = [r for r in records if f'{name}/count' in r]
    assert logged and all(r[f'{name}/count'] == len(rows) for r in logged)
    predictions = csv_rows(workdir, name, step)
    assert [i for i, _ in predictions] == [r['annot_id'] for r in rows]  # in split order
    probs = np.stack([p for _, p in predictions]).reshape(-1, 5, 4)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)
    # The accuracies follow from the file's probabilities and the labels.
    answer = np.array([r['answer_label'] for r in rows])
    rationale = np.array([r['rationale_label'] for r in rows])
    qa = probs[:, 0].argmax(-1) == answer
    qar = probs[np.arange(len(rows)), 1 + answer].argmax(-1) == rationale
    assert logged[-1][f'{name}/qa_accuracy'] == pytest.approx(qa.mean())
    assert logged[-1][f'{name}/qar_accuracy'] == pytest.approx(qar.mean())
    assert logged[-1][f'{name}/q_ar_accuracy'] == pytest.approx((qa & qar).mean())
  tt.assert_parts_merged(workdir)


def test_visualbert_finetunes_and_scores_every_example_once(data_config, tmp_path):
  """VisualBERT (the cheapest tiny design to compile), 'names' references."""
  config, final, records = finetune('visualbert', data_config.data_dir, str(tmp_path))
  assert np.isfinite(final['ce'])
  assert [r['step'] for r in records if 'vcr_val/count' in r] == [1, 2, 4]
  check_evaluations(config, records, str(tmp_path), 4)
  # `vlpjax.load` chooses as the evaluator did.
  model = vlpjax.load(str(tmp_path))
  assert model.step == 4
  evaluated = dict(csv_rows(str(tmp_path), 'vcr_val', 4))
  gt = tfds.data_source('vlp_world/tiny_gt_images', data_dir=data_config.data_dir)['train']
  for row in world_lib.make_world(vlp_world.WORLD_SIZES['tiny']).vcr['validation'][:3]:
    example = {k: json.loads(row[k]) for k in world_lib.VCR_JSON_FIELDS}
    chosen = model.choose(example['question'], example['answer_choices'],
                          example['rationale_choices'], example['objects'],
                          *tt.image_inputs(gt[row['image_index']]))
    np.testing.assert_allclose(chosen['probabilities'].reshape(-1),
                               evaluated[row['annot_id']], rtol=1e-4, atol=1e-6)
    assert chosen['answer'] == chosen['probabilities'][0].argmax()
    assert chosen['rationale'] == chosen['probabilities'][1 + chosen['answer']].argmax()


@pytest.mark.slow
@pytest.mark.parametrize('design,references', [('uniter', None), ('lxmert', None),
                                               ('vilbert', None), ('uniter', 'names')])
def test_other_designs_finetune_on_vcr(design, references, data_config, tmp_path):
  config, final, records = finetune(design, data_config.data_dir, str(tmp_path), num_steps=2,
                                    references=references)
  assert np.isfinite(final['ce'])
  check_evaluations(config, records, str(tmp_path), 2)
