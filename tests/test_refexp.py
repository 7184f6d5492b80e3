"""Referring expressions (`vlpjax.tasks.refexp`): the refcoco builder on tiny files
in the real formats (the refs pickle only when trusted, its JSON conversion,
COCO instances), IoU at the 0.5 boundary, the losses, the world's ground-truth
regions, the region slots of each design, and short fine-tunes on the tiny world
(8 CPU devices) whose evaluators score every expression once on splits the eval
batch does not divide."""
import collections
import importlib
import json
import math
import pickle

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
from vlpjax.models import get_design
from vlpjax.tasks import TASKS, get_task, refexp

pytestmark = pytest.mark.usefixtures('compile_cache')
# A multiple of the 8 devices that divides neither the world's train split (48
# expressions: two batches, the second padded) nor validation/test (8).
EVAL_BATCH = 40

# ----------------------------------------------------------------------------
# The builder, on tiny files in the real formats.

COCO_IDS = [9, 25, 30]
IMAGE_IDS = [f'COCO_train2014_{i:012d}' for i in COCO_IDS]
# COCO annotations: id -> (image id, bbox [x, y, w, h]).
ANNOTATIONS = {101: (9, [1.0, 2.0, 10.0, 20.0]), 102: (25, [0.5, 0.5, 3.0, 4.0]),
               103: (30, [5.0, 6.0, 7.0, 8.0]), 104: (9, [0.0, 0.0, 2.0, 2.0])}


def ref(ref_id, ann_id, split, sentences, first_sent_id):
  """A ref as the refer toolkit's refs(unc).p holds it."""
  return dict(ref_id=ref_id, ann_id=ann_id, image_id=ANNOTATIONS[ann_id][0] if ann_id in
              ANNOTATIONS else 9, split=split, category_id=1,
              file_name=f'COCO_train2014_{ann_id}.jpg',
              sent_ids=list(range(first_sent_id, first_sent_id + len(sentences))),
              sentences=[dict(sent=s, raw=s, tokens=s.split(), sent_id=first_sent_id + k)
                         for k, s in enumerate(sentences)])


REFS = [ref(0, 101, 'train', ['the man on the left', 'left guy'], 10),
        ref(1, 102, 'val', ['red cup'], 20),
        ref(2, 103, 'testA', ['woman in white'], 30),
        ref(3, 104, 'testB', ['small dog'], 40)]


def write_instances(path):
  path.write_text(json.dumps(dict(
      images=[dict(id=i, width=64, height=48) for i in COCO_IDS],
      annotations=[dict(id=a, image_id=i, bbox=b, category_id=1, area=b[2] * b[3])
                   for a, (i, b) in ANNOTATIONS.items()])))


@pytest.fixture(scope='module')
def refs_root(tmp_path_factory):
  """An images table of LXMERT's TSV, the refs as a pickle and as JSON, instances.json."""
  root = tmp_path_factory.mktemp('refcoco')
  tt.build_lxmert_images(root, 'refcoco_images', {'train2014_obj36.tsv': IMAGE_IDS})
  with open(root / 'refs(unc).p', 'wb') as f:
    pickle.dump(REFS, f, protocol=2)  # as the refer toolkit's Python 2 pickles
  (root / 'refs(unc).json').write_text(json.dumps(REFS))
  write_instances(root / 'instances.json')
  return root


def build_refcoco(root, config, *args):
  tt.build_table('refcoco', 'lxmert_tsv/refcoco_images', root, config, *args)


def test_builder_reads_the_trusted_pickle_and_the_json_alike(refs_root):
  with pytest.raises(formats.PickleRefusedError, match=r'refs\(unc\)\.p.*--trust_pickle'):
    build_refcoco(refs_root, 'untrusted')
  build_refcoco(refs_root, 'from_pickle', '--trust_pickle')
  build_refcoco(refs_root, 'from_json', '--file=refs=refs(unc).json')  # JSON needs no trust
  expected = {
      'train': [(0, 10, 101, 'the man on the left', 0), (0, 11, 101, 'left guy', 0)],
      'validation': [(1, 20, 102, 'red cup', 1)],
      'testA': [(2, 30, 103, 'woman in white', 2)],
      'testB': [(3, 40, 104, 'small dog', 0)]}
  for name in ('refcoco/from_pickle', 'refcoco/from_json'):
    builder = tfds.builder(name, data_dir=str(refs_root / 'data'))
    assert sorted(builder.info.splits) == sorted(expected)
    for split, rows in expected.items():
      got = tt.read_split(refs_root, name, split)
      assert [(r['ref_id'], r['sent_id'], r['ann_id'], r['text'].decode(), r['image_index'])
              for r in got] == rows, (name, split)
      assert [r['image_id'].decode() for r in got] == [IMAGE_IDS[row[-1]] for row in rows]
      for r in got:  # COCO's [x, y, w, h] -> [x1, y1, x2, y2]
        x, y, w, h = ANNOTATIONS[r['ann_id']][1]
        np.testing.assert_array_equal(r['target_box'], np.float32([x, y, x + w, y + h]))
  # --splits keeps those; the trust flag is not a setting of the table.
  build_refcoco(refs_root, 'val_only', '--file=refs=refs(unc).json', '--splits', 'validation')
  assert list(tfds.builder('refcoco/val_only', data_dir=str(refs_root / 'data')).info.splits) \
      == ['validation']
  with pytest.raises(SystemExit):  # other builders read no pickles
    ab.main(['snli_ve', '--config', 'x', '--images', 'lxmert_tsv/refcoco_images', '--data_dir',
             str(refs_root / 'data'), '--trust_pickle'])


def test_trusted_pickle_still_loads_no_class(refs_root, tmp_path):
  write_instances(tmp_path / 'instances.json')
  with open(tmp_path / 'refs(unc).p', 'wb') as f:
    pickle.dump([collections.OrderedDict(REFS[0])], f, protocol=2)
  with pytest.raises(formats.FormatError, match=r'asks for collections\.OrderedDict'):
    build_refcoco(tmp_path, 'with_class', '--trust_pickle', '--images_data_dir',
                  str(refs_root / 'data'))


def test_builder_errors_name_the_file_and_ref(refs_root, tmp_path):
  write_instances(tmp_path / 'instances.json')
  bad = [REFS[0], ref(7, 999, 'val', ['no such annotation'], 70), REFS[1],
         ref(8, 102, 'validation', ['bad split name'], 80), REFS[2], REFS[3],
         dict(REFS[3], ref_id=9, image_id=12345, sentences=[dict(sent='lost', sent_id=90)])]
  (tmp_path / 'refs.json').write_text(json.dumps(bad))
  args = ['--file=refs=refs.json', '--images_data_dir', str(refs_root / 'data')]
  with pytest.raises(formats.FormatError,
                     match=r"refs\.json: ref #1 \(ref_id 7\): ann_id 999 is not in the "
                     'instances file'):
    build_refcoco(tmp_path, 'errors', *args)
  build_refcoco(tmp_path, 'errors', *args, '--on_error', 'skip')
  assert [r['ref_id'] for r in tt.read_split(tmp_path, 'refcoco/errors', 'validation')] == [1]
  assert [r['ref_id'] for r in tt.read_split(tmp_path, 'refcoco/errors', 'testB')] == [3]
  assert tt.build_report(tmp_path, 'refcoco/errors')['by_reason'] == {
      'missing annotation': 1, 'bad split': 1, 'missing image': 1}
  bad_box = json.loads((tmp_path / 'instances.json').read_text())
  bad_box['annotations'][0]['bbox'] = [1.0, 2.0, 0.0, 20.0]
  (tmp_path / 'instances.json').write_text(json.dumps(bad_box))
  (tmp_path / 'refs.json').write_text(json.dumps(REFS))
  with pytest.raises(formats.FormatError, match=r'ref #0 \(ref_id 0\): bad bbox'):
    build_refcoco(tmp_path, 'bad_box', *args)


# ----------------------------------------------------------------------------
# IoU, the metric and the losses, by hand.


@pytest.mark.parametrize('a, b, iou, correct', [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, True),
    ([0, 0, 4, 1], [0, 0, 2, 1], 0.5, False),          # exactly 0.5: wrong (> 0.5)
    ([0, 0, 3, 1], [1, 0, 4, 1], 0.5, False),          # shifted, 2 / 4
    ([0, 0, 4, 1], [0, 0, 2.0004, 1], 2.0004 / 4, True),  # just above
    ([0, 0, 2, 1], [1, 0, 3, 1], 1 / 3, False),
    ([10, 10, 20, 30], [12, 12, 20, 30], 8 * 18 / 200, True),  # 0.72
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, False),          # touching
    ([0, 0, 1, 1], [5, 5, 6, 6], 0.0, False),          # apart
    ([3, 3, 3, 3], [3, 3, 3, 3], 0.0, False),          # no area
])
def test_iou_at_the_half_boundary(a, b, iou, correct):
  assert refexp.box_iou(a, b) == pytest.approx(iou, abs=1e-12)
  assert refexp.box_iou(b, a) == pytest.approx(iou, abs=1e-12)
  assert refexp.is_correct(np.float32(a), np.float32(b)) == correct


def test_accuracy_stats_and_records():
  predicted = np.float32([[0, 0, 2, 2], [0, 0, 4, 1], [10, 10, 20, 30]])
  target = np.float32([[0, 0, 2, 2], [0, 0, 2, 1], [12, 12, 20, 30]])
  stats = refexp.accuracy_stats(predicted, target)
  assert stats == {'correct': 2, 'count': 3} and stats['count'].dtype == np.int64
  records = refexp.prediction_records({'ref_id': np.array([5, 6, 7])}, np.array([0, 3, 1]),
                                      predicted)
  assert json.loads(json.dumps(records))[1] == {'ref_id': 6, 'box': [0, 0, 4, 1], 'region': 3}


def test_losses_by_hand():
  scores = jnp.array([[0.0, math.log(3.0), refexp.MASKED_SCORE],
                      [2.0, 0.0, 0.0]])
  # CE: softmax over the real regions; the padded one has no mass.
  assert refexp.ce_loss(scores, jnp.array([1, 0])) == pytest.approx(
      (-math.log(3 / 4) - math.log(math.e**2 / (math.e**2 + 2))) / 2, rel=1e-6)
  # ViLBERT's BCE: IoU targets below 0.5 count as 0; padded regions count nothing.
  iou = jnp.array([[0.4, 0.8, 0.0], [0.5, 0.0, 0.3]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  bce = lambda x, t: math.log1p(math.exp(-abs(x))) + max(x, 0) - x * t
  expected = (bce(0, 0) + bce(math.log(3), 0.8) + bce(2, 0.5) + bce(0, 0) + bce(0, 0)) / 2
  assert refexp.bce_loss(scores, iou, mask) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------
# The embedded world: ground-truth regions, examples, each design's slots.


def test_world_gt_regions_are_the_objects_true_boxes(data_config):
  scenes = world_lib.make_world(vlp_world.WORLD_SIZES['tiny']).scenes
  source = tfds.data_source('vlp_world/tiny_gt_images', data_dir=data_config.data_dir)['train']
  detected = tfds.data_source('vlp_world/tiny_images', data_dir=data_config.data_dir)['train']
  assert len(source) == len(scenes) == len(detected)
  for index in (0, 5, len(scenes) - 1):
    row, scene = source[index], scenes[index]
    assert row['index'] == index and row['image_id'].decode() == scene.image_id
    assert (row['image_w'], row['image_h']) == (detected[index]['image_w'],
                                                detected[index]['image_h'])
    np.testing.assert_array_equal(row['boxes'], scene.boxes)
    np.testing.assert_array_equal(row['object_ids'], [o.shape for o in scene.objects])
    assert row['features'].shape == (len(scene.objects), vlp_world.WORLD_SIZES['tiny'].feature_dim)


@pytest.mark.parametrize('design', ['uniter', 'vilbert'])
def test_examples_map_scores_to_the_image_boxes(data_config, design):
  """Candidates and targets are the image's boxes whatever the design's leading
  slots (ViLBERT's [IMG]); on ground-truth regions the target is the object."""
  leading = get_design(design).leading_slots
  images = tfds.data_source('vlp_world/tiny_images', data_dir=data_config.data_dir)['train']
  refs = tfds.data_source('vlp_world/tiny_refexp', data_dir=data_config.data_dir)['validation']
  detected = refexp.open_examples(data_config, design, split='validation', regions='detected')
  batch = detected.examples(np.arange(len(detected)))
  for row in range(len(detected)):
    image = images[refs[row]['image_index']]
    count = int(image['num_boxes'])
    np.testing.assert_array_equal(batch['region_boxes'][row, :count], image['boxes'])
    assert batch['candidate_mask'][row].sum() == count
    assert batch['region_mask'][row].sum() == count + leading
    ious = refexp.box_iou(image['boxes'], refs[row]['target_box'][None])
    assert batch['target_region'][row] == ious.argmax()
  gt = refexp.open_examples(data_config, design, split='validation', regions='gt')
  gt_batch = gt.examples(np.arange(len(gt)))
  np.testing.assert_allclose(gt_batch['region_iou'].max(-1), 1.0)
  mixed = refexp.open_examples(data_config, design, split='validation', regions='mixed')
  mixed_batch = mixed.examples(np.arange(len(mixed)))
  np.testing.assert_array_equal(mixed_batch['region_boxes'][:, :batch['region_boxes'].shape[1]]
                                * batch['candidate_mask'][..., None],
                                batch['region_boxes'] * batch['candidate_mask'][..., None])
  assert (mixed_batch['candidate_mask'].sum(-1) >= batch['candidate_mask'].sum(-1)).all()


@pytest.mark.slow  # compiling the tiny ViLBERT takes half a minute on 2 cores
def test_model_scores_the_image_regions_not_the_img_slot(data_config):
  """ViLBERT's [IMG] slot is dropped: scores [B, R] per image region, padding at
  MASKED_SCORE."""
  design = 'vilbert'
  assert get_design(design).leading_slots == 1
  examples = refexp.open_examples(data_config, design, split='validation', regions='detected')
  batch = examples.examples(np.arange(len(examples)))
  config = tiny_config(design, data_config.data_dir, 'refexp')
  config.data.max_regions = data_config.max_regions
  model = refexp.make_model(config)
  kwargs = {k: jnp.asarray(batch[k]) for k in refexp.MODEL_INPUT_KEYS}
  kwargs['region_feats'] = kwargs['region_feats'].astype(jnp.float32)
  scores = jax.jit(lambda k: model.init_with_output(jax.random.key(0), **k)[0])(
      kwargs)['scores']
  assert scores.shape == batch['candidate_mask'].shape
  assert (np.asarray(scores)[batch['candidate_mask'] == 0] == refexp.MASKED_SCORE).all()
  assert (np.asarray(scores)[batch['candidate_mask'] == 1] > refexp.MASKED_SCORE).all()


def test_two_processes_count_every_expression_once(tmp_path):
  path = tmp_path / 'refexp_val.json'
  results = evaluator_worker.run_two_processes([path], mode='refexp')
  # 37 expressions in batches of 16 (the last padded); process p builds rows [8p, 8p + 8).
  assert results[0]['seen'] == [*range(0, 8), *range(16, 24), *range(32, 37)]
  assert results[1]['seen'] == [*range(8, 16), *range(24, 32)]
  # Wrong: the 10 multiples of 4.
  for result in results:
    assert result['summary'] == {'accuracy': 27 / 37, 'count': 37}
  records = json.loads(path.read_text())
  assert [r['ref_id'] for r in records] == [100 + i for i in range(37)]  # in split order
  assert [r['region'] for r in records] == [i % 3 for i in range(37)]


def test_config_recipes_and_evaluators():
  assert 'refexp' in TASKS and get_task('refexp') is refexp
  uniter = importlib.import_module('configs.uniter').get_config('base,task=refexp')
  assert (uniter.train.global_batch_size, uniter.train.learning_rate,
          uniter.train.num_steps) == (128, 1e-4, 24_000)
  assert uniter.data.max_text_len == 60
  assert {k: (v.split, v.regions) for k, v in uniter.evals.items()} == {
      'refexp_val': ('validation', 'detected'), 'refexp_testA': ('testA', 'detected'),
      'refexp_testB': ('testB', 'detected')}
  lxmert = importlib.import_module('configs.lxmert')
  assert lxmert.get_config('base,task=refexp').train.to_dict() == lxmert.get_config(
      'base,task=vqa').train.to_dict()  # no published recipe: the VQA one
  small = importlib.import_module('configs.vilbert').get_config('small,task=refexp')
  assert refexp.resolve_loss(small) == 'bce' and refexp.resolve_train_regions(small) == 'mixed'
  assert {k: (v.split, v.regions) for k, v in small.evals.items()} == {
      'refexp_val': ('validation', 'detected'), 'refexp_val_gt': ('validation', 'gt'),
      'refexp_test': ('test', 'detected'), 'refexp_test_gt': ('test', 'gt')}
  small.refexp.head = 'deep'
  with pytest.raises(ValueError, match=r"refexp.head must be one of \('linear', 'mlp'\)"):
    refexp.resolve_head(small)
  small.evals = ml_collections.ConfigDict({'x': dict(small.evals.refexp_val, type='vqa')})
  with pytest.raises(ValueError, match="the refexp task has evaluators of type 'refexp'"):
    refexp.make_evaluators(small, None, None, '')


# ----------------------------------------------------------------------------
# Fine-tuning from the command line's config, end to end.


def finetune(design, data_dir, workdir, num_steps=4, **refexp_fields):
  """`configs/<design>.py:tiny,task=refexp` on the tiny world, evaluated every 2
  steps on validation (detected and gt) and at the end on test and on train,
  in batches of EVAL_BATCH: (config, last metrics, metrics.jsonl records)."""
  config = tiny_config(design, data_dir, 'refexp')
  config.data.max_regions = vlp_world.WORLD_SIZES['tiny'].num_regions
  config.refexp.update(refexp_fields)
  config.evals.refexp_train = dict(config.evals.refexp_test, split='train')
  return tt.finetune(config, workdir, num_steps, EVAL_BATCH)


def check_evaluations(config, workdir, records, num_steps):
  image_tables = {'detected': 'tiny_images', 'gt': 'tiny_gt_images'}
  for name, evaluator in config.evals.items():
    refs = tfds.data_source('vlp_world/tiny_refexp', data_dir=config.data.data_dir)[
        evaluator.split]
    rows = [refs[i] for i in range(len(refs))]
    assert len(rows) % EVAL_BATCH
    logged = [r for r in records if f'{name}/count' in r]
    # Every eval runs at the first and the last step; validation every 2 as well.
    steps = sorted({1, num_steps} | ({2} if evaluator.split == 'validation' else set()))
    assert [r['step'] for r in logged] == steps, name
    assert all(r[f'{name}/count'] == len(rows) for r in logged)
    predictions = tt.predictions_of(workdir, name, num_steps)
    assert [p['ref_id'] for p in predictions] == [r['ref_id'] for r in rows]  # split order
    images = tfds.data_source(f'vlp_world/{image_tables[evaluator.regions]}',
                              data_dir=config.data.data_dir)['train']
    correct = 0
    for p, row in zip(predictions, rows):
      assert set(p) == {'ref_id', 'box', 'region'}
      boxes = images[row['image_index']]['boxes']
      assert 0 <= p['region'] < len(boxes)
      np.testing.assert_array_equal(np.float32(p['box']), boxes[p['region']])
      correct += bool(refexp.is_correct(np.float32(p['box']), row['target_box']))
    assert logged[-1][f'{name}/accuracy'] == correct / len(rows), name
  tt.assert_parts_merged(workdir)


def test_uniter_finetunes_and_scores_every_expression_once(data_config, tmp_path):
  """UNITER: linear head, CE over regions, trained on ground-truth regions."""
  workdir = str(tmp_path)
  config, final, records = finetune('uniter', data_config.data_dir, workdir)
  assert np.isfinite(final['ce']) and 0 <= final['train_accuracy'] <= 1
  check_evaluations(config, workdir, records, 4)
  # `vlpjax.load` picks the regions the evaluator picked.
  model = vlpjax.load(workdir)
  assert model.step == 4
  rows, image = tt.rows_of_first_image(data_config.data_dir, 'tiny_refexp')
  regions, boxes = model.locate([r['text'].decode() for r in rows], *tt.image_inputs(image))
  evaluated = {p['ref_id']: p for p in tt.predictions_of(workdir, 'refexp_val', 4)}
  assert regions.tolist() == [evaluated[r['ref_id']]['region'] for r in rows]
  np.testing.assert_array_equal(boxes, [evaluated[r['ref_id']]['box'] for r in rows])


@pytest.mark.slow
@pytest.mark.parametrize('design, fields', [
    ('vilbert', {}),                                  # BCE on IoU targets, mixed regions
    ('lxmert', {'head': 'mlp'}),                      # UNITER's 2-layer head
    ('visualbert', {'train_regions': 'detected'}),
])
def test_other_designs_finetune(design, fields, data_config, tmp_path):
  config, final, records = finetune(design, data_config.data_dir, str(tmp_path), num_steps=2,
                                    **fields)
  assert np.isfinite(final[refexp.resolve_loss(config)])
  check_evaluations(config, str(tmp_path), records, 2)
