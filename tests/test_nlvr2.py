"""The NLVR2 task (`vlpjax.tasks.nlvr2`): the nlvr2 table builder on lil-lab's
and LXMERT's files, the embedded world's identifiers, accuracy and consistency
against hand-computed cases, the CSV prediction file, the heads' shapes, two
processes, and short fine-tunes on the tiny world (8 CPU devices) whose
evaluators judge every example once on splits the eval batch does not divide."""
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
from vlpjax import train
from vlpjax.data import annotations_builder as ab
from vlpjax.data import formats, vlp_world
from vlpjax.data import world as world_lib
from vlpjax.evaluators import common
from vlpjax.tasks import TASKS, get_task, nlvr2

pytestmark = pytest.mark.usefixtures('compile_cache')
# A multiple of the 8 devices that divides neither the tiny world's validation
# and test splits (4 pairs each) nor its train split (24).
EVAL_BATCH = 16

# ----------------------------------------------------------------------------
# The builder, on tiny files in the real formats.

# (identifier, sentence, label): sentence 0 of set 10 asked of pairs 0 and 1.
PAIRS = {
    'train': [('train-10-0-0', 'One image shows two dogs.', 'True'),
              ('train-10-1-0', 'One image shows two dogs.', 'False'),
              ('train-10-0-1', 'There are exactly three dogs.', 'False'),
              ('train-11-0-0', 'A bottle is on the left.', 'True')],
    'validation': [('dev-20-0-0', 'The left image has a cat.', 'True'),
                   ('dev-20-1-0', 'The left image has a cat.', 'True')],
    'test': [('test1-30-0-0', 'Both images show a bird.', 'False')],
}
LXMERT_FILES = dict(ab.Nlvr2.LXMERT_FILES)


def image_ids():
  """The images of every pair, `<identifier less its sentence>-img0/img1`."""
  bases = dict.fromkeys('-'.join(i.split('-')[:3]) for pairs in PAIRS.values()
                        for i, _, _ in pairs)
  return [f'{base}-img{k}' for base in bases for k in (0, 1)]


def write_lil_lab(path, pairs):
  with open(path, 'w', encoding='utf-8') as f:
    for identifier, sentence, label in pairs:
      f.write(json.dumps(dict(
          identifier=identifier, sentence=sentence, label=label, writer='7', synset='dog',
          left_url=f'https://example.com/{identifier}/left.jpg',
          right_url=f'https://example.com/{identifier}/right.jpg',
          validation={'3': label}, query='two dogs')) + '\n')


def write_lxmert(path, pairs):
  entries = []
  for uid, (identifier, sentence, label) in enumerate(pairs):
    base = '-'.join(identifier.split('-')[:3])
    entries.append(dict(identifier=identifier, img0=f'{base}-img0', img1=f'{base}-img1',
                        label=int(label == 'True'), sent=sentence, uid=f'nlvr2_{uid}'))
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(entries, f)


def build_nlvr2(root, config, *args):
  """`python -m vlpjax.data.annotations_builder nlvr2` against lxmert_tsv/nlvr2."""
  tt.build_table('nlvr2', 'lxmert_tsv/nlvr2', root, config, *args)


@pytest.fixture(scope='module')
def nlvr2_root(tmp_path_factory):
  """An LXMERT-TSV images table of the pairs' images, and both formats' files."""
  root = tmp_path_factory.mktemp('nlvr2')
  tt.build_lxmert_images(root, 'nlvr2', {'nlvr2_obj36.tsv': image_ids()})
  for split, pairs in PAIRS.items():
    write_lil_lab(root / ab.Nlvr2.DEFAULT_FILES[split], pairs)
    write_lxmert(root / LXMERT_FILES[split], pairs)
  return root


def test_builder_reads_lil_lab_and_lxmert_files_alike(nlvr2_root):
  build_nlvr2(nlvr2_root, 'tiny_lil_lab')
  build_nlvr2(nlvr2_root, 'tiny_lxmert',
              *(f'--file={role}={name}' for role, name in LXMERT_FILES.items()))
  rows_of = {image_id: row for row, image_id in enumerate(image_ids())}
  for name in ('nlvr2/tiny_lil_lab', 'nlvr2/tiny_lxmert'):
    for split, pairs in PAIRS.items():
      rows = tt.read_split(nlvr2_root, name, split)
      assert [(r['identifier'].decode(), r['text'].decode(), int(r['label'])) for r in rows] == [
          (i, s, int(l == 'True')) for i, s, l in pairs], (name, split)
      for row, (identifier, _, _) in zip(rows, pairs):
        base = '-'.join(identifier.split('-')[:3])
        for side, k in (('left', 0), ('right', 1)):
          assert row[f'{side}_image_id'].decode() == f'{base}-img{k}'
          assert row[f'{side}_image_index'] == rows_of[f'{base}-img{k}']


def test_builder_errors_name_the_file_line_and_identifier(nlvr2_root, tmp_path):
  args = ['--images_data_dir', str(nlvr2_root / 'data'), '--file=train=train.json',
          '--file=validation=dev.json', '--splits', 'train', 'validation']
  write_lil_lab(tmp_path / 'train.json', PAIRS['train'])
  missing_image = ('dev-99-0-0', 'The left image has a cat.', 'True')
  write_lil_lab(tmp_path / 'dev.json', PAIRS['validation'] + [missing_image])
  with pytest.raises(formats.FormatError, match=r"dev\.json: line 3: identifier dev-99-0-0: "
                     r"missing image: 'dev-99-0-img0'"):
    build_nlvr2(tmp_path, 'errors', *args)
  bad_label = ('dev-20-2-0', 'The left image has a cat.', 'maybe')
  write_lil_lab(tmp_path / 'dev.json', PAIRS['validation'] + [bad_label, missing_image])
  with pytest.raises(formats.FormatError, match=r"dev\.json: line 3: identifier dev-20-2-0: "
                     r"bad label 'maybe'"):
    build_nlvr2(tmp_path, 'errors', *args)
  build_nlvr2(tmp_path, 'errors', *args, '--on_error', 'skip')
  rows = tt.read_split(tmp_path, 'nlvr2/errors', 'validation')
  assert [r['identifier'] for r in rows] == [b'dev-20-0-0', b'dev-20-1-0']
  assert tt.build_report(tmp_path, 'nlvr2/errors')['by_reason'] == {'missing image': 1,
                                                                    'bad label': 1}
  # LXMERT's labels are 0/1; an entry is named by its place in the list.
  write_lxmert(tmp_path / 'valid.json', PAIRS['validation'])
  entries = json.loads((tmp_path / 'valid.json').read_text())
  entries[1]['label'] = 'True'
  (tmp_path / 'valid.json').write_text(json.dumps(entries))
  with pytest.raises(formats.FormatError, match=r"valid\.json: entry 1: identifier dev-20-1-0: "
                     r"bad label 'True'; expected 0 or 1"):
    build_nlvr2(tmp_path, 'lxmert_errors', *args, '--file=validation=valid.json')


# ----------------------------------------------------------------------------
# The embedded world's nlvr2 table.


def test_world_identifiers_group_the_pairs_of_one_statement():
  rows = [{'text': t} for t in ('a', 'b', 'a', 'c', 'a', 'b')]
  assert world_lib.nlvr2_identifiers('train', rows) == [
      'train-0-0-0', 'train-1-0-0', 'train-0-1-0', 'train-2-0-0', 'train-0-2-0', 'train-1-1-0']
  world = world_lib.make_world(vlp_world.WORLD_SIZES['tiny'])
  for split, split_rows in world.nlvr2.items():
    identifiers = [r['identifier'] for r in split_rows]
    assert identifiers == world_lib.nlvr2_identifiers(split, split_rows)
    groups = nlvr2.sentence_groups(identifiers)
    texts = [r['text'] for r in split_rows]
    # One sentence per statement: same text <=> same group.
    assert len(set(zip(groups.tolist(), texts))) == len(set(texts)) == groups.max() + 1


def test_examples_give_both_images_regions(data_config):
  examples = nlvr2.open_examples(data_config, 'vilbert', 'validation')
  batch = examples.examples(np.arange(3))
  world = world_lib.make_world(vlp_world.WORLD_SIZES['tiny'])
  rows = world.nlvr2['validation'][:3]
  np.testing.assert_array_equal(batch['label'], [r['label'] for r in rows])
  images = tfds.data_source('vlp_world/tiny_images', data_dir=data_config.data_dir)['train']
  for side in nlvr2.SIDES:
    for row, count, feats in zip(rows, batch[f'{side}_region_mask'].sum(-1),
                                 batch[f'{side}_region_feats']):
      image = images[row[f'{side}_image_index']]
      # ViLBERT's [IMG] slot first, then the image's own regions.
      assert count == 1 + min(image['num_boxes'], data_config.max_regions)
      np.testing.assert_array_equal(feats[1:count], image['features'][:count - 1])
  identifiers, gold = nlvr2.read_identifiers_and_labels(data_config, 'validation')
  assert list(identifiers) == [r['identifier'] for r in world.nlvr2['validation']]
  assert list(gold) == [nlvr2.LABELS[r['label']] for r in world.nlvr2['validation']]


# ----------------------------------------------------------------------------
# Metrics and the prediction file.


def test_sentence_of_blanks_the_pair_field_as_metrics_py():
  assert nlvr2.sentence_of('test1-189-3-0') == 'test1-189--0'
  assert nlvr2.sentence_of('dev-850-0-1') != nlvr2.sentence_of('dev-850-0-0')
  with pytest.raises(ValueError, match="'dev-850' is not"):
    nlvr2.sentence_of('dev-850')


def test_accuracy_and_consistency_by_hand():
  # Sentence dev-1--0 asked of 3 pairs, one judged wrong; dev-1--1 of 2 pairs,
  # both right; dev-2--0 of 1 pair, right ('true' counts: metrics.py lowercases).
  identifiers = ['dev-1-0-0', 'dev-1-1-0', 'dev-1-2-0', 'dev-1-0-1', 'dev-1-1-1', 'dev-2-0-0']
  gold = ['True', 'False', 'True', 'False', 'True', 'True']
  predicted = ['True', 'False', 'False', 'False', 'True', 'true']
  groups = nlvr2.sentence_groups(identifiers)
  np.testing.assert_array_equal(groups, [0, 0, 0, 1, 1, 2])
  stats = nlvr2.pair_stats(predicted, gold, groups, 3)
  assert (stats['correct'], stats['count']) == (5, 6)
  np.testing.assert_array_equal(stats['wrong'], [1, 0, 0])
  np.testing.assert_array_equal(stats['asked'], [3, 2, 1])
  assert nlvr2.summary(stats) == {'accuracy': 5 / 6, 'consistency': 2 / 3, 'count': 6}
  # Statistics of two halves (two processes) add up to the whole's.
  halves = [nlvr2.pair_stats(predicted[s], gold[s], groups[s], 3)
            for s in (slice(0, 2), slice(2, None))]
  merged = nlvr2.merge_stats(nlvr2.merge_stats(nlvr2.zero_stats(3), halves[0]), halves[1])
  assert nlvr2.summary(merged) == nlvr2.summary(stats)
  # The first half alone: sentence 0 all right so far, sentences 1 and 2 unasked.
  assert nlvr2.summary(halves[0])['consistency'] == 1.0
  assert math.isnan(nlvr2.summary(nlvr2.zero_stats(3))['consistency'])


def test_csv_prediction_file(tmp_path):
  records = nlvr2.prediction_records(['dev-1-1-0', 'dev-1-0-0'], ['False', 'True'])
  path = tmp_path / 'nlvr2_val_step4.csv'
  common.write_prediction_parts(path, [dict(r, _index=i) for r, i in zip(records, (1, 0))],
                                render=nlvr2.csv_text)
  assert path.read_text() == 'dev-1-0-0,True\ndev-1-1-0,False\n'
  assert os.listdir(tmp_path) == [path.name]
  with pytest.raises(ValueError, match=r"predictions \['yes'\] are not in"):
    nlvr2.prediction_records(['dev-1-0-0'], ['yes'])


def test_two_processes_count_every_example_once(tmp_path):
  path = tmp_path / 'nlvr2_val.csv'
  results = evaluator_worker.run_two_processes([path], mode='nlvr2')
  # 37 examples in batches of 16 (the last padded); process p builds rows
  # [8p, 8p + 8) of each, so sentences 2 (6, 7, 8) and 5 (15, 16, 17) straddle them.
  assert results[0]['seen'] == [*range(0, 8), *range(16, 24), *range(32, 37)]
  assert results[1]['seen'] == [*range(8, 16), *range(24, 32)]
  # Wrong: 0, 5, 10, ..., 35 (8 examples) in sentences 0, 1, 3, 5, 6, 8, 10, 11
  # of the 13: 5 consistent.
  for result in results:
    assert result['summary'] == {'accuracy': 29 / 37, 'consistency': 5 / 13, 'count': 37}
  assert path.read_text() == ''.join(
      f'dev-{i // 3}-{i % 3}-0,{"False" if i % 5 == 0 else "True"}\n' for i in range(37))


# ----------------------------------------------------------------------------
# Heads and configs.


@pytest.mark.parametrize('design,head', [
    ('uniter', 'paired_attn'),  # the default run's: UNITER's third token type
    pytest.param('lxmert', 'paired_mlp', marks=pytest.mark.slow),
    pytest.param('uniter', 'paired', marks=pytest.mark.slow),
    pytest.param('visualbert', 'joint_linear', marks=pytest.mark.slow)])
def test_heads_and_region_token_types(design, head):
  config = importlib.import_module(f'configs.{design}').get_config('tiny,task=nlvr2')
  config.nlvr2.head = head
  model = nlvr2.make_model(config)
  b, t, r, f = 3, 5, 4, config.model.feature_dim
  loc = nlvr2.get_design(design).loc_dim
  rng = np.random.default_rng(0)
  batch = dict(input_ids=np.ones((b, t), np.int32), text_mask=np.ones((b, t), np.int32),
               token_type_ids=np.zeros((b, t), np.int32))
  for side in nlvr2.SIDES:
    batch.update({f'{side}_region_feats': rng.normal(size=(b, r, f)).astype(np.float32),
                  f'{side}_region_loc': rng.uniform(size=(b, r, loc)).astype(np.float32),
                  f'{side}_region_mask': np.ones((b, r), np.int32)})
  params = jax.jit(model.init)(jax.random.key(0), **batch)['params']
  logits = model.apply({'params': params}, **batch)['logits']
  assert logits.shape == (b, 2) and logits.dtype == jnp.float32
  # Swapping the two images changes the judgement's inputs (types or order).
  swapped = dict(batch, left_region_feats=batch['right_region_feats'],
                 right_region_feats=batch['left_region_feats'])
  assert not np.allclose(model.apply({'params': params}, **swapped)['logits'], logits)
  if design == 'uniter':
    # The right image's type is the model's third row, started from row 1 after
    # init.source (UNITER's init_type_embedding); the backbone keeps its 2 rows.
    params = nn.meta.unbox(params)
    assert params['backbone']['embeddings']['token_type_embeddings']['embedding'].shape[0] == 2
    config.init.source = 'workdir:/somewhere'
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params)
    started = nlvr2.init_heads(config, params, abstract)
    np.testing.assert_array_equal(
        started[nlvr2.EXTRA_TYPES_NAME][0],
        params['backbone']['embeddings']['token_type_embeddings']['embedding'][1])
  else:
    # A design without pair types has no rows to start: its params pass through.
    config.init.source = 'workdir:/somewhere'
    assert nlvr2.init_heads(config, params, params) is params


def test_config_recipes_and_evaluators():
  assert 'nlvr2' in TASKS and get_task('nlvr2') is nlvr2
  lxmert = importlib.import_module('configs.lxmert').get_config('base,task=nlvr2')
  assert (lxmert.train.global_batch_size, lxmert.train.learning_rate) == (32, 5e-5)
  assert lxmert.train.num_steps == math.ceil(4 * 86_373 / 32)  # 4 epochs
  assert {k: (v.type, v.split) for k, v in lxmert.evals.items()} == {
      'nlvr2_val': ('nlvr2', 'validation'), 'nlvr2_test': ('nlvr2', 'test')}
  uniter = importlib.import_module('configs.uniter').get_config('base,task=nlvr2')
  assert (uniter.train.learning_rate, uniter.train.num_steps) == (3e-5, 8_000)
  assert nlvr2.resolve_head('uniter') == 'paired_attn'
  small = importlib.import_module('configs.visualbert').get_config('small,task=nlvr2')
  assert small.evals.nlvr2_val.log_steps == 200
  with pytest.raises(ValueError, match='nlvr2.head must be one of'):
    nlvr2.resolve_head('visualbert', 'pooled_mlp')
  small.evals = ml_collections.ConfigDict({'v': dict(small.evals.nlvr2_val, type='vqa')})
  with pytest.raises(ValueError, match="the nlvr2 task has evaluators of type 'nlvr2'"):
    nlvr2.make_evaluators(small, None, None, '')


# ----------------------------------------------------------------------------
# Fine-tuning from the command line's config, end to end.


def finetune(design, data_dir, workdir, num_steps=4, head=None, init_source=''):
  """`configs/<design>.py:tiny,task=nlvr2` on the tiny world, evaluated every 2
  steps on validation and train, at the end on test, in batches of EVAL_BATCH:
  (the run's config, its last metrics, its metrics.jsonl records)."""
  config = tiny_config(design, data_dir, 'nlvr2')
  config.nlvr2.head = head
  config.init.source = init_source
  config.evals.nlvr2_train = dict(config.evals.nlvr2_val, split='train')
  return tt.finetune(config, workdir, num_steps, EVAL_BATCH)


def check_evaluations(config, records, workdir, step):
  for name in ('nlvr2_val', 'nlvr2_test', 'nlvr2_train'):
    split = config.evals[name].split
    identifiers, gold = nlvr2.read_identifiers_and_labels(config.data, split)
    assert len(identifiers) % EVAL_BATCH
    logged = [r for r in records if f'{name}/count' in r]
    assert logged and all(r[f'{name}/count'] == len(identifiers) for r in logged)
    with open(os.path.join(workdir, 'predictions', f'{name}_step{step}.csv'),
              encoding='utf-8') as f:
      lines = [line.split(',') for line in f.read().splitlines()]
    assert [i for i, _ in lines] == list(identifiers)  # in split order
    assert {p for _, p in lines} <= {'True', 'False'}
    right = [p == g for (_, p), g in zip(lines, gold)]
    assert logged[-1][f'{name}/accuracy'] == sum(right) / len(right)
    groups = nlvr2.sentence_groups(identifiers)
    consistent = [all(r for r, g in zip(right, groups) if g == s) for s in set(groups)]
    assert logged[-1][f'{name}/consistency'] == sum(consistent) / len(consistent)
  tt.assert_parts_merged(workdir)


def test_visualbert_finetunes_and_scores_every_example_once(data_config, tmp_path):
  """VisualBERT (the cheapest tiny design to compile): one sequence, both images."""
  config, final, records = finetune('visualbert', data_config.data_dir, str(tmp_path))
  assert np.isfinite(final['ce'])
  assert [r['step'] for r in records if 'nlvr2_val/count' in r] == [1, 2, 4]
  check_evaluations(config, records, str(tmp_path), 4)
  # `vlpjax.load` judges a sentence about two images as the evaluator did.
  model = vlpjax.load(str(tmp_path))
  assert model.step == 4
  with open(tmp_path / 'predictions' / 'nlvr2_val_step4.csv', encoding='utf-8') as f:
    evaluated = dict(line.split(',') for line in f.read().splitlines())
  images = tfds.data_source('vlp_world/tiny_images', data_dir=data_config.data_dir)['train']
  for row in world_lib.make_world(vlp_world.WORLD_SIZES['tiny']).nlvr2['validation']:
    left, right = (tt.image_inputs(images[row[f'{side}_image_index']]) for side in nlvr2.SIDES)
    assert model.judge([row['text']], left, right) == [evaluated[row['identifier']]]


@pytest.mark.slow
@pytest.mark.parametrize('design,head', [('lxmert', None), ('vilbert', None),
                                         ('uniter', None), ('uniter', 'paired')])
def test_other_designs_finetune_on_nlvr2(design, head, data_config, tmp_path):
  config, final, records = finetune(design, data_config.data_dir, str(tmp_path), num_steps=2,
                                    head=head)
  assert np.isfinite(final['ce'])
  check_evaluations(config, records, str(tmp_path), 2)


@pytest.mark.slow
def test_uniter_starts_from_a_pretraining_run_with_two_token_types(data_config, tmp_path):
  """A pretraining run's UNITER (2 token types) starts an NLVR2 run: its table
  loads as it is, the right image's row is the task's (its start from row 1:
  `test_heads_and_region_token_types`)."""
  pretrain = tiny_config('uniter', data_config.data_dir)
  pretrain.train.num_steps = 1
  train.train_and_evaluate(pretrain, str(tmp_path / 'pretrain'))
  _, final, _ = finetune('uniter', data_config.data_dir, str(tmp_path / 'nlvr2'), num_steps=1,
                         init_source=f'workdir:{tmp_path / "pretrain"}')
  assert np.isfinite(final['ce'])
