"""The SNLI-VE task (`vlpjax.tasks.snli_ve`): the snli_ve table builder on tiny
files in SNLI-VE's jsonl format, the embedded world's snli_ve table (splits of
disjoint images, labels that follow from the scene), accuracy and the
prediction file, the losses, and a short fine-tune of each design on the tiny
world (8 CPU devices) whose evaluators score every pair once on splits the
eval batch does not divide."""
import importlib
import json
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import task_testing as tt
from test_finetune import tiny_config
import vlpjax
from vlpjax.data import annotations_builder as ab
from vlpjax.data import formats, tables, vlp_world
from vlpjax.data import world as world_lib
from vlpjax.data.tokenizer import read_vocab
from vlpjax.tasks import TASKS, get_task, snli_ve, vqa

pytestmark = pytest.mark.usefixtures('compile_cache')
EVAL_BATCH = 8  # the 8 devices; the tiny world's validation and test splits have 12 pairs

# ----------------------------------------------------------------------------
# The builder, on tiny files in SNLI-VE's format.

FLICKR_IDS = ['3416050480', '2248487950', '4600125577']
# (pairID, Flickr30K_ID, sentence2, gold_label) per file; '-' = no consensus.
PAIRS = {
    'train': [('3416050480.jpg#4r1n', '3416050480', 'A man is sleeping.', 'neutral'),
              ('3416050480.jpg#4r1e', '3416050480', 'A person is outside.', 'entailment'),
              ('2248487950.jpg#0r1c', '2248487950', 'Nobody is there.', 'contradiction'),
              ('2248487950.jpg#0r2n', '2248487950', 'The dog is happy.', '-'),
              ('4600125577.jpg#2r1e', '4600125577', 'Two kids play.', 'entailment')],
    'validation': [('4600125577.jpg#3r1c', '4600125577', 'The kids sleep.', 'contradiction'),
                   ('2248487950.jpg#1r1n', '2248487950', 'It is a park.', 'neutral')],
    'test': [('3416050480.jpg#0r1e', '3416050480', 'Someone walks.', 'entailment')],
}


def snli_ve_line(pair_id, image_id, sentence, gold_label):
  """One line as the released `snli_ve_*.jsonl` files have it."""
  entry = {'annotator_labels': [gold_label if gold_label != '-' else 'neutral'],
           'captionID': pair_id.split('r')[0], 'gold_label': gold_label,
           'pairID': pair_id, 'sentence1': 'A caption of the image.',
           'sentence1_binary_parse': '( A caption )', 'sentence1_parse': '(ROOT (S ...))',
           'sentence2': sentence, 'sentence2_binary_parse': '( ... )',
           'sentence2_parse': '(ROOT (S ...))', 'Flickr30K_ID': image_id}
  return json.dumps(entry)


def write_snli_ve(path, pairs, lines=None):
  lines = [snli_ve_line(*pair) for pair in pairs] if lines is None else lines
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')


def build_snli_ve(root, config, *args):
  """`python -m vlpjax.data.annotations_builder snli_ve` against lxmert_tsv/flickr30k."""
  tt.build_table('snli_ve', 'lxmert_tsv/flickr30k', root, config, *args)


@pytest.fixture(scope='module')
def flickr_root(tmp_path_factory):
  """An LXMERT-TSV images table of three Flickr30k ids, and the three jsonl files."""
  root = tmp_path_factory.mktemp('snli_ve')
  tt.build_lxmert_images(root, 'flickr30k', {'flickr30k_obj36.tsv': FLICKR_IDS})
  for split, pairs in PAIRS.items():
    write_snli_ve(root / ab.SnliVe.DEFAULT_FILES[split], pairs)
  return root


def test_builder_reads_the_jsonl_files_and_skips_no_consensus(flickr_root):
  build_snli_ve(flickr_root, 'tiny')  # on_error 'raise': '-' is skipped all the same
  for split, pairs in PAIRS.items():
    rows = tt.read_split(flickr_root, 'snli_ve/tiny', split)
    kept = [p for p in pairs if p[3] != '-']
    assert [(r['pair_id'].decode(), r['image_id'].decode(), r['text'].decode(),
             world_lib.ENTAILMENT_LABELS[r['label']]) for r in rows] == kept, split
    assert [r['image_index'] for r in rows] == [FLICKR_IDS.index(p[1]) for p in kept]
  report = tt.build_report(flickr_root, 'snli_ve/tiny')
  assert report['by_reason'] == {'no consensus': 1}
  assert report['skipped'][0]['where'].endswith('snli_ve_train.jsonl: line 4: pair '
                                                '2248487950.jpg#0r2n')


def test_builder_errors_name_the_file_line_and_pair(flickr_root, tmp_path):
  args = ['--images_data_dir', str(flickr_root / 'data'), '--file=train=train.jsonl',
          '--file=validation=dev.jsonl', '--splits', 'train', 'validation']
  write_snli_ve(tmp_path / 'train.jsonl', PAIRS['train'])
  missing_image = ('1000000.jpg#0r1e', '1000000', 'A cat.', 'entailment')
  write_snli_ve(tmp_path / 'dev.jsonl', PAIRS['validation'] + [missing_image])
  with pytest.raises(formats.FormatError, match=r"dev\.jsonl: line 3: pair 1000000\.jpg#0r1e: "
                     r"missing image: '1000000'"):
    build_snli_ve(tmp_path, 'errors', *args)
  lines = [snli_ve_line(*p) for p in PAIRS['validation'] + [missing_image]]
  lines += ['{"Flickr30K_ID": "2248487950", "sentence2": "half a line',
            snli_ve_line('4600125577.jpg#3r2x', '4600125577', 'Kids.', 'maybe'),
            snli_ve_line(*PAIRS['validation'][0])]
  write_snli_ve(tmp_path / 'dev.jsonl', None, lines[:2] + lines[3:])
  with pytest.raises(formats.FormatError, match=r'dev\.jsonl: line 3: not valid JSON'):
    build_snli_ve(tmp_path, 'errors', *args)
  write_snli_ve(tmp_path / 'dev.jsonl', None, lines[:2] + lines[4:])
  with pytest.raises(formats.FormatError, match=r"dev\.jsonl: line 3: pair 4600125577\.jpg#3r2x"
                     r": bad gold_label 'maybe'"):
    build_snli_ve(tmp_path, 'errors', *args)
  write_snli_ve(tmp_path / 'dev.jsonl', None, lines)
  build_snli_ve(tmp_path, 'errors', *args, '--on_error', 'skip')
  assert [r['pair_id'] for r in tt.read_split(tmp_path, 'snli_ve/errors', 'validation')] == [
      p[0].encode() for p in PAIRS['validation']]
  assert tt.build_report(tmp_path, 'snli_ve/errors')['by_reason'] == {
      'no consensus': 1, 'missing image': 1, 'malformed line': 1, 'bad label': 1,
      'duplicate pair': 1}
  # A line without pairID is named by its file and line.
  entry = json.loads(snli_ve_line(*PAIRS['test'][0]))
  del entry['pairID']
  write_snli_ve(tmp_path / 'dev.jsonl', None, [json.dumps(entry)])
  build_snli_ve(tmp_path, 'no_ids', *args)
  assert tt.read_split(tmp_path, 'snli_ve/no_ids', 'validation')[0]['pair_id'] == b'dev.jsonl:1'


# ----------------------------------------------------------------------------
# The embedded world's snli_ve table.


_GROUP = re.compile(r'(?:(?P<colour>[a-z]+) )?(?P<noun>[a-z]+)')
_STATEMENTS = (  # the statement's form -> its label from (count in the scene, number stated)
    (re.compile(r'the image contains an? (?P<group>.+)'),
     lambda n, _: 'entailment' if n else 'contradiction'),
    (re.compile(r'the image contains (?P<number>[a-z]+) (?P<group>.+)'),
     lambda n, k: 'entailment' if n == k else 'contradiction'),
    (re.compile(r'both images contain an? (?P<group>.+)'),
     lambda n, _: 'neutral' if n else 'contradiction'),
    (re.compile(r'neither image contains an? (?P<group>.+)'),
     lambda n, _: 'contradiction' if n else 'neutral'),
    (re.compile(r'the two images contain (?P<number>[a-z]+) (?P<group>.+) in total'),
     lambda n, k: 'contradiction' if k < n else 'neutral'),
)


def label_from_scene(scene, statement):
  """The label a reader of the scene gives the statement (independent of world.py's code)."""
  for pattern, rule in _STATEMENTS:
    match = pattern.fullmatch(statement)
    if match:
      break
  else:
    raise AssertionError(f'unknown statement {statement!r}')
  group = _GROUP.fullmatch(match['group'])
  colour = group['colour']
  noun = group['noun']
  shape = next((s for s in world_lib.SHAPES if noun in (s, s + 's', s + 'es')), None)
  assert shape or noun in ('object', 'objects'), statement
  assert colour is None or colour in world_lib.COLOURS, statement
  n = sum((colour is None or world_lib.COLOURS[o.colour] == colour)
          and (shape is None or world_lib.SHAPES[o.shape] == shape) for o in scene.objects)
  number = world_lib.NUMBER_WORDS.index(match['number']) if 'number' in match.re.groupindex \
      else None
  return rule(n, number)


def test_world_table_labels_follow_from_the_scene(data_config):
  world = world_lib.make_world(vlp_world.WORLD_SIZES['tiny'])
  vocab = set(read_vocab(tables.vocab_file(data_config)))
  images_of = {}
  for split in world_lib.SPLITS:
    rows = list(tfds.data_source('vlp_world/tiny_snli_ve', split=split,
                                 data_dir=data_config.data_dir))
    assert [(r['pair_id'].decode(), r['text'].decode(), r['image_index'], r['label'])
            for r in rows] == [(r['pair_id'], r['text'], r['image_index'], r['label'])
                               for r in world.snli_ve[split]]
    assert len(rows) == len(world.split_images[split]) * 3
    images_of[split] = {r['image_index'] for r in rows}
    assert images_of[split] == set(world.split_images[split])
    for row in rows:
      scene = world.scenes[row['image_index']]
      assert row['image_id'].decode() == scene.image_id
      text = row['text'].decode()
      assert world_lib.ENTAILMENT_LABELS[row['label']] == label_from_scene(scene, text), text
      assert set(text.split()) <= vocab, text  # whole words: never spelt in characters
  assert not (images_of['train'] & images_of['validation'] or images_of['train'] &
              images_of['test'] or images_of['validation'] & images_of['test'])
  # Balanced: each label about a third of the statements.
  labels = np.array([r['label'] for rows in world.snli_ve.values() for r in rows])
  assert np.all(np.bincount(labels, minlength=3) > len(labels) / 4)


def test_examples_are_the_statements_with_one_hot_labels(data_config):
  examples = snli_ve.open_examples(data_config, 'uniter', 'validation')
  pair_ids, labels = snli_ve.read_labels(examples.pairs)
  batch = examples.examples(np.arange(5))
  np.testing.assert_array_equal(batch['answer_scores'], np.eye(3)[labels[:5]])
  assert batch['input_ids'].shape == (5, data_config.max_text_len)
  assert set(vqa.MODEL_INPUT_KEYS) <= set(batch)
  assert list(pair_ids[:2]) == ['72', '73']
  with pytest.raises(ValueError, match=r'pair 7: label 3 is not an index'):
    snli_ve.one_hot_labels(np.array([0, 3]), ['6', '7'])


# ----------------------------------------------------------------------------
# Metric, prediction file, losses.


def test_accuracy_by_hand():
  predicted = ['entailment', 'neutral', 'contradiction', 'neutral', 'entailment']
  gold = ['entailment', 'contradiction', 'contradiction', 'neutral', 'neutral']
  stats = snli_ve.accuracy_stats(predicted, gold)
  assert stats == {'correct': 3, 'count': 5}
  assert all(v.dtype == np.int64 for v in stats.values())
  assert snli_ve.summary(stats) == {'accuracy': 0.6, 'count': 5}
  # Summed over two processes' rows: (3 + 1) / (5 + 2).
  both = {k: stats[k] + v for k, v in snli_ve.accuracy_stats(
      ['neutral', 'neutral'], ['neutral', 'entailment']).items()}
  assert snli_ve.summary(both) == {'accuracy': 4 / 7, 'count': 7}
  assert np.isnan(snli_ve.summary(snli_ve.accuracy_stats([], []))['accuracy'])
  with pytest.raises(ValueError, match='2 predictions but 1 labels'):
    snli_ve.accuracy_stats(['neutral', 'neutral'], ['neutral'])
  with pytest.raises(ValueError, match=r"gold labels \['-'\] are not in"):
    snli_ve.accuracy_stats(['neutral'], ['-'])


def test_prediction_records():
  records = snli_ve.prediction_records(np.array(['3416050480.jpg#4r1n', '7'], object),
                                       ['neutral', 'entailment'])
  assert json.loads(json.dumps(records)) == [
      {'pair_id': '3416050480.jpg#4r1n', 'label': 'neutral'},
      {'pair_id': '7', 'label': 'entailment'}]
  with pytest.raises(ValueError, match='1 pair ids but 2 labels'):
    snli_ve.prediction_records(['1'], ['neutral', 'neutral'])


def test_losses_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
  one_hot = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  targets = dict(answer_scores=one_hot, weights=jnp.ones(2))
  softplus = lambda x: np.log1p(np.exp(x))
  # BCE x 3: each output's BCE summed, averaged over the two pairs.
  bce = np.mean([softplus(-2.0) + softplus(0.0) + softplus(-1.0),
                 softplus(0.5) + softplus(-0.5) + softplus(1.5)])
  ce = np.mean([-np.log(np.exp(2.0) / np.exp([2.0, 0.0, -1.0]).sum()),
                -np.log(np.exp(0.5) / np.exp([0.5, 0.5, 1.5]).sum())])
  for design, kind, expected in (('uniter', 'bce', bce), ('lxmert', 'ce', ce)):
    config = ml_collections.ConfigDict(dict(model=dict(name=design),
                                            snli_ve=snli_ve.default_snli_ve_config()))
    loss, metrics = snli_ve.compute_losses(config, {'logits': logits}, targets, 'snli_ve')
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert set(metrics) == {kind, 'train_accuracy'}
    assert float(metrics['train_accuracy']) == 0.5  # the first right, the second not


# ----------------------------------------------------------------------------
# Configs.


def test_config_heads_recipes_and_evaluators():
  assert 'snli_ve' in TASKS and get_task('snli_ve') is snli_ve
  for design in ('uniter', 'vilbert', 'lxmert', 'visualbert'):
    module = importlib.import_module(f'configs.{design}')
    base = module.get_config('base,task=snli_ve')
    # TASKS.md names no SNLI-VE recipe: the design's VQA one.
    assert base.train.to_dict() == module.get_config('base,task=vqa').train.to_dict()
    assert base.data.max_text_len == vqa.TEXT_LENGTHS[design]
    assert {k: (v.type, v.split) for k, v in base.evals.items()} == {
        'snli_ve_val': ('snli_ve', 'validation'), 'snli_ve_test': ('snli_ve', 'test')}
  vilbert = importlib.import_module('configs.vilbert').get_config('small,task=snli_ve')
  assert (snli_ve.resolve_head(vilbert), snli_ve.resolve_loss(vilbert)) == ('pooled_linear', 'ce')
  assert snli_ve.make_model(vilbert).num_answers == 3
  assert vilbert.evals.snli_ve_val.log_steps == 200 and vilbert.data.snli_ve_dataset is None
  uniter = importlib.import_module('configs.uniter').get_config('small,task=snli_ve')
  assert (snli_ve.resolve_head(uniter), snli_ve.resolve_loss(uniter)) == ('pooled_mlp', 'bce')
  uniter.snli_ve.head = 'mask_slot'
  with pytest.raises(ValueError, match=r"snli_ve\.head must be one of \('pooled_mlp', "
                     r"'pooled_linear'\), got 'mask_slot'"):
    snli_ve.resolve_head(uniter)
  uniter.evals = ml_collections.ConfigDict(
      {'snli_ve_val': dict(uniter.evals.snli_ve_val, type='vqa')})
  with pytest.raises(ValueError, match="the snli_ve task has evaluators of type 'snli_ve'"):
    snli_ve.make_evaluators(uniter, None, None, '')


# ----------------------------------------------------------------------------
# Fine-tuning from the command line's config, end to end.


def finetune(design, data_dir, workdir, num_steps=4):
  """`configs/<design>.py:tiny,task=snli_ve` on the tiny world, evaluated every 2
  steps on validation and at the end on test, in batches of EVAL_BATCH:
  (the run's config, its last metrics, its metrics.jsonl records)."""
  return tt.finetune(tiny_config(design, data_dir, 'snli_ve'), workdir, num_steps, EVAL_BATCH)


def check_every_pair_scored_once(config, workdir, records, step):
  for name, split in (('snli_ve_val', 'validation'), ('snli_ve_test', 'test')):
    pair_ids, labels = snli_ve.read_labels(
        tables.open_split(config.data, snli_ve.TABLE, split, snli_ve.PAIR_KEYS))
    assert len(pair_ids) % EVAL_BATCH  # the last batch is padded
    logged = [r for r in records if f'{name}/count' in r]
    assert logged and all(r[f'{name}/count'] == len(pair_ids) for r in logged)
    predictions = tt.predictions_of(workdir, name, step)
    assert [p['pair_id'] for p in predictions] == list(pair_ids)  # in split order
    assert all(set(p) == {'pair_id', 'label'} and p['label'] in snli_ve.LABELS
               for p in predictions)
    correct = sum(p['label'] == snli_ve.LABELS[g] for p, g in zip(predictions, labels))
    assert logged[-1][f'{name}/accuracy'] == correct / len(pair_ids)
  tt.assert_parts_merged(workdir)


def test_finetune_scores_every_pair_once_and_loads(data_config, tmp_path):
  """VisualBERT (the cheapest tiny design to compile; the pooled MLP and CE)."""
  workdir = str(tmp_path)
  config, final, records = finetune('visualbert', data_config.data_dir, workdir)
  assert np.isfinite(final['ce'])
  assert [r['step'] for r in records if 'snli_ve_val/count' in r] == [1, 2, 4]
  check_every_pair_scored_once(config, workdir, records, step=4)
  # `vlpjax.load` labels an image's statements as the evaluator did.
  model = vlpjax.load(workdir)
  assert model.step == 4 and model.answers == list(snli_ve.LABELS)
  rows, image = tt.rows_of_first_image(data_config.data_dir, 'tiny_snli_ve')
  evaluated = {p['pair_id']: p['label'] for p in tt.predictions_of(workdir, 'snli_ve_val', 4)}
  assert model.answer([r['text'].decode() for r in rows], *tt.image_inputs(image)) == [
      evaluated[r['pair_id'].decode()] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize('design', ['uniter', 'vilbert', 'lxmert'])
def test_other_designs_finetune_on_snli_ve(design, data_config, tmp_path):
  workdir = str(tmp_path)
  config, final, records = finetune(design, data_config.data_dir, workdir, num_steps=2)
  assert np.isfinite(final[snli_ve.LOSSES[design]])
  assert [r['step'] for r in records if 'snli_ve_val/count' in r] == [1, 2]
  check_every_pair_scored_once(config, workdir, records, step=2)
