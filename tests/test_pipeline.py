"""Tests of the streaming pretraining input pipeline (`vlpjax.data.tables`, `examples`,
`input_pipeline`) and the tokenizer.

Most tests read small hand-made tables in the data contract's format whose
content identifies itself: image i's region k has feature value 10 * i + k, and
each sentence names its image ("image three caption one"), so a batch shows which
image and which sentence every example joined. The embedded world's tiny build
is the integration test.
"""
import functools
import json
import logging
import os

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
import transformers
from jax.sharding import AxisType, Mesh

from vlpjax import sharding
from vlpjax.data import examples
from vlpjax.data import features_builder
from vlpjax.data import input_pipeline
from vlpjax.data import tables
from vlpjax.data import vlp_world
from vlpjax.data import world as world_lib
from vlpjax.data.features_builder import images_features
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.models import DESIGNS
from vlpjax.objectives import pretraining

from test_sharding import FakeHostDevice

# The originals' location widths, and who reads class distributions.
LOC_DIMS = {'visualbert': 4, 'lxmert': 4, 'vilbert': 5, 'uniter': 7}
NEEDS_CLASS_PROBS = ('vilbert', 'uniter')

DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
FEATURE_DIM = 8
NUM_CLASSES = 5
NUM_ANSWERS = 4
MAX_REGIONS = 4
# Per image: (num_boxes, width, height, captions, questions).
IMAGES = ((3, 640, 480, 3, 2), (5, 500, 375, 3, 1), (2, 300, 300, 2, 0),
          (4, 800, 600, 3, 2), (1, 200, 100, 1, 1), (5, 640, 640, 3, 0))
# Label of a matched pair (shared MODELS.md): ViLBERT 0 = aligned, the others 1.
MATCHED = dict(visualbert=1, vilbert=0, lxmert=1, uniter=1)
VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'image', 'caption', 'question',
         *DIGITS]


def _boxes(i: int, n: int) -> np.ndarray:
  w, h = IMAGES[i][1:3]
  k = np.arange(n, dtype=np.float32)[:, None]
  return np.concatenate([k * 10, k * 5, w - k * 20, h - k * 10], 1).astype(np.float32)


def _image_record(i: int, with_class_probs: bool) -> dict:
  n, w, h = IMAGES[i][:3]
  k = np.arange(n)
  record = dict(
      index=i, image_id=f'img{i}', image_h=h, image_w=w, num_boxes=n,
      boxes=_boxes(i, n),
      features=np.repeat((10 * i + k)[:, None], FEATURE_DIM, 1).astype(np.float16),
      object_ids=(k + 1).astype(np.int32), object_conf=np.full(n, 0.5, np.float32),
      attr_ids=(k + 2).astype(np.int32), attr_conf=np.full(n, 0.25, np.float32))
  if with_class_probs:
    record['class_probs'] = np.full((n, NUM_CLASSES), 1 / NUM_CLASSES, np.float16)
  return record


class PipelineTestImages(tfds.core.GeneratorBasedBuilder):
  """Images table; configs: 'full', 'no_class_probs', 'misordered' (index != row)."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n)
                     for n in ('full', 'no_class_probs', 'misordered')]

  def _info(self):
    with_probs = self.builder_config.name != 'no_class_probs'
    return features_builder.LocalDatasetInfo(
        builder=self, features=images_features(FEATURE_DIM, NUM_CLASSES if with_probs else None),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config.name
    for i in range(len(IMAGES)):
      record = _image_record(i, config != 'no_class_probs')
      if config == 'misordered':
        record['index'] = len(IMAGES) - 1 - i
      yield i, record


def _captions():
  rows = [(i, j) for i, image in enumerate(IMAGES) for j in range(image[3])]
  return [dict(caption_id=c, text=f'image {DIGITS[i]} caption {DIGITS[j]}', image_index=i,
               image_id=f'img{i}') for c, (i, j) in enumerate(rows)]


def _questions():
  rows = [(i, j) for i, image in enumerate(IMAGES) for j in range(image[4])]
  return [dict(question_id=q, question=f'question image {DIGITS[i]}', image_index=i,
               image_id=f'img{i}', answers=['a'] * 10,
               answer_labels=np.array([i % NUM_ANSWERS, (i + 1) % NUM_ANSWERS], np.int32),
               answer_scores=np.array([1.0, 0.3], np.float32))
          for q, (i, j) in enumerate(rows)]


class PipelineTestCaptions(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return features_builder.LocalDatasetInfo(builder=self,
                                 features=vlp_world.table_features('captions', FEATURE_DIM))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for record in _captions():
      yield record['caption_id'], record


class PipelineTestVqa(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return features_builder.LocalDatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(
        question_id=np.int64, question=tfds.features.Text(), image_index=np.int64,
        image_id=tfds.features.Text(), answers=tfds.features.Sequence(tfds.features.Text()),
        answer_labels=tfds.features.Sequence(np.int32),
        answer_scores=tfds.features.Sequence(np.float32))))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for record in _questions():
      yield record['question_id'], record


@pytest.fixture(scope='module')
def data_config(tmp_path_factory):
  """Data config over the hand-made tables, built once into a tmp dir."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for builder in (PipelineTestImages(config='full', data_dir=data_dir),
                  PipelineTestImages(config='no_class_probs', data_dir=data_dir),
                  PipelineTestImages(config='misordered', data_dir=data_dir),
                  PipelineTestCaptions(data_dir=data_dir), PipelineTestVqa(data_dir=data_dir)):
    builder.download_and_prepare(file_format='array_record')
  vqa_dir = PipelineTestVqa(data_dir=data_dir).data_dir
  with open(os.path.join(vqa_dir, 'answers.txt'), 'w') as f:
    f.write('\n'.join(f'answer{a}' for a in range(NUM_ANSWERS)) + '\n')
  vocab = os.path.join(data_dir, 'vocab.txt')
  with open(vocab, 'w') as f:
    f.write('\n'.join(VOCAB) + '\n')
  config = input_pipeline.default_data_config()
  config.update(name='pipeline_test', data_dir=data_dir, vocab_file=vocab,
                images_dataset='pipeline_test_images/full',
                captions_dataset='pipeline_test_captions', vqa_dataset='pipeline_test_vqa',
                max_text_len=8, max_regions=MAX_REGIONS, prefetch_batches=0)
  return config


def _iterator(config, design, batch_size=8, seed=0, **kwargs):
  return input_pipeline.make_pretraining_iterator(config, design,
                                                  global_batch_size=batch_size, seed=seed,
                                                  **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _decoded_images(tokenizer, input_ids, token_type_ids, segment):
  """Image named by each example's text segment (0: A, 1: B)."""
  images = []
  for ids, types in zip(input_ids, token_type_ids):
    words = tokenizer.decode(ids[types == segment]).split()
    images.append(DIGITS.index(words[words.index('image') + 1]))
  return np.array(images)


def _region_images(batch, design):
  first_real = 1 if design == 'vilbert' else 0
  return (batch['region_feats'][:, first_real, 0] // 10).astype(int)


# ----------------------------------------------------------------------------
# Tokenizer.


@pytest.mark.parametrize('cased', [False, True])
def test_tokenizer_matches_transformers(tmp_path, cased):
  words = ['a', 'red', 'cube', 'left', 'of', 'the', 'blue', 'sphere', '##s', 'is', '.']
  if cased:
    words += ['Red', 'The']
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words) + '\n')
  ours = BertTokenizer(str(vocab), 8)
  assert ours.lowercase == (not cased)  # follows the vocabulary
  reference = transformers.BertTokenizer(str(vocab), do_lower_case=not cased)
  texts = ['A red cube left of the blue spheres.', 'The Red sphère is big', 'x']
  pairs = ['a cube', 'the blue sphere is left of a red cube', 'Red']
  for args in ((texts,), (texts, pairs)):
    got = ours.encode(*args)
    want = reference(*args, padding='max_length', max_length=8, truncation='longest_first')
    np.testing.assert_array_equal(got['input_ids'], want['input_ids'])
    np.testing.assert_array_equal(got['token_type_ids'], want['token_type_ids'])
    np.testing.assert_array_equal(got['text_mask'], want['attention_mask'])
    assert got['input_ids'].dtype == np.int32 and got['input_ids'].shape == (3, 8)


def test_tokenizer_rejects_bad_vocab(tmp_path):
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('[PAD]\n[UNK]\nword\n')
  with pytest.raises(ValueError, match='missing'):
    BertTokenizer(str(vocab), 8)
  with pytest.raises(FileNotFoundError):
    BertTokenizer(str(tmp_path / 'nope.txt'), 8)


# ----------------------------------------------------------------------------
# Region inputs.


def _gathered(first_slot):
  """Two real regions of a 200x100 image, one padded slot, `first_slot` empty slots."""
  def slots(*rows):
    return np.array([[np.zeros_like(rows[0])] * first_slot + list(rows)], np.float32)
  return dict(
      feats=slots([1., 2.], [3., 4.], [0., 0.]),
      boxes=slots([0, 0, 100, 50], [50, 25, 200, 100], [0, 0, 0, 0]),
      count=np.array([2], np.int32), image_w=np.array([200.], np.float32),
      image_h=np.array([100.], np.float32),
      object_ids=slots(3, 4, 0).astype(np.int32), object_conf=slots(1., 1., 0.),
      attr_ids=slots(5, 6, 0).astype(np.int32), attr_conf=slots(1., 1., 0.))


def test_region_inputs_per_design():
  corners = np.array([[0, 0, .5, .5], [.25, .25, 1, 1], [0, 0, 0, 0]], np.float32)
  for design in ('lxmert', 'visualbert'):
    inputs = examples.region_inputs(design, _gathered(0))
    np.testing.assert_allclose(inputs['region_loc'][0], corners)
    np.testing.assert_array_equal(inputs['region_mask'], [[1, 1, 0]])
    np.testing.assert_array_equal(inputs['region_feats'], _gathered(0)['feats'])

  uniter = examples.region_inputs('uniter', _gathered(0))
  np.testing.assert_allclose(uniter['region_loc'][0], [
      [0, 0, .5, .5, .5, .5, .25], [.25, .25, 1, 1, .75, .75, .5625], [0] * 7])

  vilbert = examples.region_inputs('vilbert', _gathered(1))
  assert vilbert['region_feats'].shape == (1, 4, 2)
  np.testing.assert_allclose(vilbert['region_feats'][0], [[2., 3.], [1., 2.], [3., 4.], [0, 0]])
  np.testing.assert_allclose(vilbert['region_loc'][0], [
      [0, 0, 1, 1, 1], [0, 0, .5, .5, .25], [.25, .25, 1, 1, .5625], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(vilbert['region_mask'], [[1, 1, 1, 0]])
  np.testing.assert_array_equal(vilbert['object_ids'], [[0, 3, 4, 0]])
  np.testing.assert_array_equal(vilbert['object_conf'], [[0, 1, 1, 0]])
  with pytest.raises(ValueError, match="config.model.name must be one of .* got 'bert'"):
    examples.region_inputs('bert', _gathered(0))


def test_hashed_uniform():
  u = examples.hashed_uniform(3, np.arange(100_000), 1)
  assert u.min() >= 0 and u.max() < 1
  assert abs(u.mean() - 0.5) < 0.01
  np.testing.assert_array_equal(u, examples.hashed_uniform(3, np.arange(100_000), 1))
  assert not np.array_equal(u, examples.hashed_uniform(4, np.arange(100_000), 1))


def test_caption_groups_partner():
  image_of_caption = np.array([2, 0, 2, 1, 2, 0])
  groups = examples.CaptionGroups.from_image_index(image_of_caption, 4)
  rng = np.random.default_rng(0)
  for caption in range(6):
    image = image_of_caption[caption]
    partners = {int(groups.partner(np.array([caption]), np.array([image]),
                                   rng.random(1))[0]) for _ in range(50)}
    expected = set(np.flatnonzero(image_of_caption == image)) - {caption} or {caption}
    assert partners == expected


# ----------------------------------------------------------------------------
# Batches from the hand-made tables.


@pytest.mark.parametrize('table,keys', [
    ('pipeline_test_images/full', tables.IMAGE_KEYS + ('class_probs',)),
    ('pipeline_test_captions', ('caption_id', 'text', 'image_index', 'image_id')),
    ('pipeline_test_vqa', ('question', 'image_index', 'answer_labels', 'answer_scores'))])
def test_record_decoder_matches_tfds(data_config, table, keys):
  source = tfds.data_source(table, split='train', data_dir=data_config.data_dir)
  decoder = tables.RecordDecoder(source.dataset_info.features, keys)
  assert tables.RecordDecoder.supports(source.dataset_info.features, keys)
  for index in range(len(source)):
    want = source[index]
    got = decoder(source.data_source[index])
    assert set(got) == set(keys)
    for key in keys:
      assert np.asarray(got[key]).dtype == np.asarray(want[key]).dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize('design', DESIGNS)
def test_batches_join_and_follow_conventions(data_config, design):
  tokenizer = BertTokenizer(data_config.vocab_file, data_config.max_text_len)
  batches = _take(_iterator(data_config, design), 4)
  extra = 1 if design == 'vilbert' else 0
  mismatched = []
  for batch in batches:
    b = 8
    assert batch['input_ids'].shape == (b, 8) and batch['input_ids'].dtype == np.int32
    assert batch['region_feats'].shape == (b, MAX_REGIONS + extra, FEATURE_DIM)
    assert batch['region_feats'].dtype == np.float16  # as stored; widened on device
    assert batch['region_loc'].shape == (b, MAX_REGIONS + extra, LOC_DIMS[design])
    assert ('class_probs' in batch) == (design in NEEDS_CLASS_PROBS)
    image = _region_images(batch, design)
    # Regions: detector order, truncated to max_regions, padding zeroed.
    real = np.minimum([IMAGES[i][0] for i in image], MAX_REGIONS)
    np.testing.assert_array_equal(batch['region_mask'].sum(1), real + extra)
    k = np.arange(MAX_REGIONS)
    want_feats = np.where(k < real[:, None], 10 * image[:, None] + k, 0)
    np.testing.assert_array_equal(batch['region_feats'][:, extra:, 0], want_feats)
    np.testing.assert_array_equal(batch['object_ids'][:, extra:],
                                  np.where(k < real[:, None], k + 1, 0))
    size = np.array([IMAGES[i][1:3] for i in image], np.float32)
    want_loc = np.stack([_boxes(i, MAX_REGIONS) for i in image]) / np.tile(size, 2)[:, None]
    np.testing.assert_allclose(batch['region_loc'][:, extra:, :4],
                               want_loc * (k < real[:, None])[..., None], rtol=1e-6)
    # Pairs: the label says whether the text is about the regions' image.
    matched = batch['match_label'] == MATCHED[design]
    text_image = _decoded_images(tokenizer, batch['input_ids'], batch['token_type_ids'], 0)
    if design == 'visualbert':
      np.testing.assert_array_equal(text_image, image)
      second = _decoded_images(tokenizer, batch['input_ids'], batch['token_type_ids'], 1)
      np.testing.assert_array_equal(second == image, matched)
    else:
      np.testing.assert_array_equal(text_image == image, matched)
    mismatched.extend(~matched)
  assert 0.2 < np.mean(mismatched) < 0.8  # mismatch_prob 0.5 over 32 examples


def test_no_mismatches_and_epoch_reshuffle(data_config):
  tokenizer = BertTokenizer(data_config.vocab_file, data_config.max_text_len)
  config = data_config.copy_and_resolve_references()
  config.mismatch_prob = 0.0
  n = len(_captions())
  epochs = _take(_iterator(config, 'lxmert', batch_size=n), 3)  # one batch = one epoch
  orders = []
  for batch in epochs:
    assert np.all(batch['match_label'] == 1)
    texts = [tokenizer.decode(ids) for ids in batch['input_ids']]
    assert sorted(texts) == sorted(c['text'] for c in _captions())  # each once per epoch
    orders.append(texts)
  assert orders[0] != orders[1] != orders[2]


def test_negatives_only_in_the_batches_that_ask(data_config):
  """A batch without negatives has every row matched: the rows the default
  stream matched are unchanged, the others keep their sentence and take its
  image; a batch with negatives is the default one."""
  tokenizer = BertTokenizer(data_config.vocab_file, data_config.max_text_len)
  default = _take(_iterator(data_config, 'uniter'), 4)
  some = _iterator(data_config, 'uniter', negatives_at=lambda b: b % 2 == 1)
  assert some.get_state()['pipeline']['negatives'] == 'by step'
  assert 'negatives' not in _iterator(data_config, 'uniter').get_state()['pipeline']
  for number, (want, got) in enumerate(zip(default, _take(some, 4))):
    kept = want['match_label'] == MATCHED['uniter']
    if number % 2:
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
      continue
    assert not kept.all()
    assert np.all(got['match_label'] == MATCHED['uniter'])
    np.testing.assert_array_equal(got['input_ids'], want['input_ids'])
    for key in want:
      np.testing.assert_array_equal(got[key][kept], want[key][kept], err_msg=key)
    text_image = _decoded_images(tokenizer, got['input_ids'], got['token_type_ids'], 0)
    np.testing.assert_array_equal(_region_images(got, 'uniter'), text_image)


def test_examples_independent_of_batch_size(data_config):
  small = _take(_iterator(data_config, 'lxmert', batch_size=4), 6)
  large = _take(_iterator(data_config, 'lxmert', batch_size=8), 3)
  for key in ('input_ids', 'region_feats', 'match_label'):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in small]),
                                  np.concatenate([b[key] for b in large]))
  other_seed = next(_iterator(data_config, 'lxmert', batch_size=8, seed=1))
  assert not np.array_equal(other_seed['input_ids'], large[0]['input_ids'])


@pytest.mark.parametrize('design', ['vilbert', 'lxmert'])
def test_cached_images_give_the_same_batches(data_config, design):
  from_disk, cached = (data_config.copy_and_resolve_references() for _ in range(2))
  from_disk.cache_images, cached.cache_images = False, True
  for want, got in zip(_take(_iterator(from_disk, design), 2),
                       _take(_iterator(cached, design), 2)):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


@pytest.mark.parametrize('design', ['vilbert', 'lxmert'])
def test_images_store_gives_the_same_batches(data_config, design, tmp_path):
  """The raw memory-mapped store (built once, reused by the next table and by a
  worker process) gathers what the records give; a gs:// store is refused."""
  from_disk, stored = (data_config.copy_and_resolve_references() for _ in range(2))
  from_disk.cache_images = False
  stored.images_store_dir = str(tmp_path / 'store')
  want = _take(_iterator(from_disk, design), 2)
  for workers in (0, 1):
    stored.worker_count = workers
    iterator = _iterator(stored, design)
    for batch, got in zip(want, _take(iterator, 2)):
      assert batch.keys() == got.keys()
      for key in batch:
        np.testing.assert_array_equal(batch[key], got[key], err_msg=key)
    iterator.close()
  (store,) = os.listdir(stored.images_store_dir)  # one store, no partial builds left
  assert store.startswith('pipeline_test_images_full-')
  assert sorted(os.listdir(os.path.join(stored.images_store_dir, store)))[0] == 'COMPLETE'
  stored.images_store_dir = 'gs://bucket/store'
  with pytest.raises(ValueError, match='images_store_dir must be a directory on this machine'):
    _iterator(stored, design)


@pytest.mark.parametrize('design', ['vilbert', 'uniter'])
def test_widened_features_are_the_stored_values_in_float32(data_config, design):
  config = data_config.copy_and_resolve_references()
  config.widen_features = True
  for stored, widened in zip(_take(_iterator(data_config, design), 2),
                             _take(_iterator(config, design), 2)):
    assert stored.keys() == widened.keys()
    for key in stored:
      if key in ('region_feats', 'class_probs'):
        assert (stored[key].dtype, widened[key].dtype) == (np.float16, np.float32), key
        if design == 'vilbert' and key == 'region_feats':
          # [IMG] (slot 0): the float32 mean, rounded to float16 when not widened.
          np.testing.assert_allclose(stored[key][:, 0], widened[key][:, 0], rtol=1e-3)
          stored[key], widened[key] = stored[key][:, 1:], widened[key][:, 1:]
        np.testing.assert_array_equal(stored[key].astype(np.float32), widened[key], err_msg=key)
      else:
        np.testing.assert_array_equal(stored[key], widened[key], err_msg=key)


def test_images_are_cached_by_default_when_they_fit(data_config):
  source = tfds.data_source('pipeline_test_images/full', split='train',
                            data_dir=data_config.data_dir)
  table = lambda **kw: tables.ImageTable(source, MAX_REGIONS, name='t',
                                           with_class_probs=True, **kw)
  assert table(cache=None).cache and not table(cache=None, cache_max_gib=1e-9).cache
  assert not table(cache=False).cache and table(cache=True, cache_max_gib=1e-9).cache


def test_resume_is_exact(data_config, tmp_path):
  iterator = _iterator(data_config, 'uniter')
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 4)
  # JSON round trip, as the trainer stores it.
  restored = _iterator(data_config, 'uniter')
  restored.set_state(json.loads(json.dumps(state)))
  for want, got in zip(expected, _take(restored, 4)):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  # grain's orbax handler.
  iterator = _iterator(data_config, 'uniter')
  _take(iterator, 3)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / 'ckpt', args=grain.checkpoint.CheckpointSave(iterator))
  restored = _iterator(data_config, 'uniter')
  checkpointer.restore(tmp_path / 'ckpt', args=grain.checkpoint.CheckpointRestore(restored))
  np.testing.assert_array_equal(next(restored)['input_ids'], expected[0]['input_ids'])
  # A state only restores into the pipeline that made it.
  with pytest.raises(ValueError, match='different pipeline'):
    _iterator(data_config, 'lxmert').set_state(state)


def test_global_batch_on_mesh(data_config):
  assert jax.device_count() >= 8
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'fsdp'))
  local = next(_iterator(data_config, 'vilbert', batch_size=16))
  batch = next(_iterator(data_config, 'vilbert', batch_size=16, mesh=mesh))
  assert local.keys() == batch.keys()
  for key, value in batch.items():
    assert isinstance(value, jax.Array)
    assert value.sharding.spec[0] == ('data', 'fsdp')
    assert value.sharding.mesh.shape == mesh.shape
    assert len(value.addressable_shards) == 8
    assert all(s.data.shape[0] == 2 for s in value.addressable_shards)
    np.testing.assert_array_equal(np.asarray(value), local[key], err_msg=key)
  # Mesh without an fsdp axis: the batch goes over 'data' alone.
  data_only = Mesh(np.array(jax.devices()[:8]), ('data',))
  batch = next(_iterator(data_config, 'lxmert', batch_size=8, mesh=data_only))
  assert batch['input_ids'].sharding.spec[0] in ('data', ('data',))
  with pytest.raises(ValueError, match='does not divide'):
    _iterator(data_config, 'lxmert', batch_size=12, mesh=mesh)


def test_processes_take_their_rows_of_one_global_order(data_config, monkeypatch):
  """Each of 2 processes builds its half of the 1-process run's batches, step for
  step, across epochs: the order is a function of the global position only, so a
  run resumes on another number of processes with the same examples."""
  steps = len(_captions()) // 8 + 3  # into the second epoch
  single = _take(_iterator(data_config, 'lxmert', batch_size=8), steps)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  halves = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    halves.append(_take(_iterator(data_config, 'lxmert', batch_size=8), steps))
  for step in range(steps):
    for key, value in single[step].items():
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), value, err_msg=key)


def test_qa_targets(data_config):
  config = data_config.copy_and_resolve_references()
  config.qa = True
  tokenizer = BertTokenizer(config.vocab_file, config.max_text_len)
  questions = 0
  for batch in _take(_iterator(config, 'lxmert', batch_size=16), 3):
    assert batch['answer_scores'].shape == (16, NUM_ANSWERS)
    texts = [tokenizer.decode(ids) for ids in batch['input_ids']]
    is_question = np.array([t.startswith('question') for t in texts])
    valid = batch['qa_valid'] == 1
    matched = batch['match_label'] == 1
    np.testing.assert_array_equal(valid, is_question & matched)
    # The sentence shown, a replacement included, is what `shows_question` marks.
    np.testing.assert_array_equal(batch['shows_question'] == 1, is_question)
    image = _region_images(batch, 'lxmert')
    for row in np.flatnonzero(valid):
      want = np.zeros(NUM_ANSWERS, np.float32)
      want[[image[row] % NUM_ANSWERS, (image[row] + 1) % NUM_ANSWERS]] = [1.0, 0.3]
      np.testing.assert_allclose(batch['answer_scores'][row], want)
    np.testing.assert_array_equal(batch['answer_scores'][~valid], 0)
    questions += valid.sum()
  assert questions > 0


def test_captions_only_batches(data_config):
  """A captions-only batch keeps the default stream's matched caption pairs,
  shows captions only (negatives too), and resumes exactly; later batches are
  the default ones. Without `data.qa` the option is refused."""
  config = data_config.copy_and_resolve_references()
  config.qa = True
  tokenizer = BertTokenizer(config.vocab_file, config.max_text_len)
  default = _take(_iterator(config, 'lxmert', batch_size=16), 4)
  first_two = lambda b: b < 2
  iterator = _iterator(config, 'lxmert', batch_size=16, captions_only_at=first_two)
  assert iterator.get_state()['pipeline']['captions_only'] == 'by step'
  got = _take(iterator, 1)
  state = iterator.get_state()
  got += _take(iterator, 3)
  replaced = 0
  for number, (want, batch) in enumerate(zip(default, got)):
    if number >= 2:
      for key in want:
        np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
      continue
    # A matched caption is the same pair; a negative is now drawn among captions.
    kept = (want['shows_question'] == 0) & (want['match_label'] == MATCHED['lxmert'])
    texts = [tokenizer.decode(ids) for ids in batch['input_ids']]
    assert not any(t.startswith('question') for t in texts)
    np.testing.assert_array_equal(batch['shows_question'], 0)
    np.testing.assert_array_equal(batch['qa_valid'], 0)
    for key in want:
      np.testing.assert_array_equal(batch[key][kept], want[key][kept], err_msg=key)
    replaced += (want['shows_question'] == 1).sum()
  assert replaced > 0
  restored = _iterator(config, 'lxmert', batch_size=16, captions_only_at=first_two)
  restored.set_state(state)
  for want, batch in zip(got[1:], _take(restored, 3)):
    for key in want:
      np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
  with pytest.raises(ValueError, match='needs data.qa=True'):
    _iterator(data_config, 'lxmert', captions_only_at=first_two)


def test_clear_errors(data_config):
  config = data_config.copy_and_resolve_references()
  config.images_dataset = 'pipeline_test_images/no_class_probs'
  lxmert = next(_iterator(config, 'lxmert'))  # LXMERT needs no class distributions
  assert 'class_probs' not in lxmert
  with pytest.raises(ValueError, match='no class_probs'):
    next(_iterator(config, 'uniter'))
  config.images_dataset = 'pipeline_test_images/misordered'
  with pytest.raises(ValueError, match='index order'):
    next(_iterator(config, 'lxmert'))
  with pytest.raises(ValueError, match='uniter has no QA objective'):
    config = data_config.copy_and_resolve_references()
    config.qa = True
    _iterator(config, 'uniter')
  with pytest.raises(ValueError, match="must be one of .* got 'bert'"):
    _iterator(data_config, 'bert')
  config = data_config.copy_and_resolve_references()
  config.captions_dataset = 'pipeline_test_missing'
  with pytest.raises(Exception, match='pipeline_test_missing'):
    _iterator(config, 'lxmert')


def test_dataset_info(data_config):
  info = tables.dataset_info(data_config)
  assert info['feature_dim'] == FEATURE_DIM
  assert info['num_object_classes'] == NUM_CLASSES
  assert info['vocab_size'] == len(VOCAB)
  assert info['num_answers'] == NUM_ANSWERS
  assert info['num_images'] == len(IMAGES)
  assert info['vocab_file'] == data_config.vocab_file


# ----------------------------------------------------------------------------
# The embedded world (tiny build).


@pytest.fixture(scope='module')
def world_config(tmp_path_factory):
  """The tiny embedded world, built on first use by the pipeline itself."""
  config = input_pipeline.default_data_config()
  config.update(size='tiny', data_dir=str(tmp_path_factory.mktemp('world')),
                max_regions=vlp_world.WORLD_SIZES['tiny'].num_regions, prefetch_batches=0)
  tables.dataset_info(config)  # builds the tables it reads
  return config


def test_embedded_world_info(world_config):
  info = tables.dataset_info(world_config)
  size = vlp_world.WORLD_SIZES['tiny']
  assert info['feature_dim'] == size.feature_dim
  assert info['num_object_classes'] == len(world_lib.OBJECT_CLASSES)
  assert info['num_attributes'] == len(world_lib.COLOURS)
  assert info['num_answers'] == len(world_lib.ANSWERS)
  assert info['num_images'] == size.num_images
  assert info['vocab_file'] == vlp_world.vocab_path(world_config.data_dir, 'tiny')
  with open(info['vocab_file']) as f:
    assert info['vocab_size'] == len(f.read().splitlines())


@pytest.mark.parametrize('design', DESIGNS)
def test_embedded_world_join(world_config, design):
  """Regions come from the image their caption describes (or, mismatched, another)."""
  images = tfds.data_source('vlp_world/tiny_images', split='train',
                            data_dir=world_config.data_dir)
  captions = tfds.data_source('vlp_world/tiny_captions', split='train',
                              data_dir=world_config.data_dir)
  tokenizer = BertTokenizer(tables.vocab_file(world_config), 64)  # no truncation
  caption_ids = {}
  for record in captions:
    ids = tokenizer.encode([record['text'].decode()])['input_ids'][0]
    caption_ids.setdefault(record['image_index'], []).append(tuple(ids[1:ids.argmin() - 1]))

  def about(image, text):  # a caption of `image` starts with `text` (pairs are truncated)
    return any(c[:len(text)] == text for c in caption_ids[image])

  features = [images[i]['features'].astype(np.float32) for i in range(len(images))]
  extra = 1 if design == 'vilbert' else 0
  agree = []
  for batch in _take(_iterator(world_config, design, batch_size=16), 2):
    matched = batch['match_label'] == MATCHED[design]
    for row in range(16):
      count = batch['region_mask'][row].sum() - extra
      regions = batch['region_feats'][row, extra:extra + count]
      image = [i for i, f in enumerate(features)
               if len(f) == count and np.array_equal(f, regions)]
      assert len(image) == 1
      segments = batch['input_ids'][row][batch['text_mask'][row] == 1]
      separators = np.flatnonzero(segments == tokenizer.sep_id)
      first = tuple(segments[1:separators[0]])
      if design == 'visualbert':
        assert about(image[0], first)
        text = tuple(segments[separators[0] + 1:separators[1]])
      else:
        text = first
      if matched[row]:
        assert about(image[0], text)
      agree.append(about(image[0], text))
  assert np.mean(agree) < 0.9  # mismatched pairs are (mostly) about other images


@pytest.mark.parametrize('design, cache_images', [('uniter', True), ('vilbert', False)])
def test_embedded_world_workers(world_config, design, cache_images):
  """Worker processes (which hand region arrays over in shared memory) give the
  in-process batches, and resume exactly; UNITER's with the train task's
  negatives by step (a picklable function for the workers)."""
  world_config = world_config.copy_and_resolve_references()
  world_config.cache_images = cache_images
  config = world_config.copy_and_resolve_references()
  config.worker_count = 1
  run = ml_collections.ConfigDict(dict(seed=0, pretrain=pretraining.default_pretrain_config(design)))
  kwargs = {}
  if design == 'uniter':
    kwargs['negatives_at'] = functools.partial(pretraining.draws_negatives, design, run)
  in_process = _take(_iterator(world_config, design, **kwargs), 4)
  iterator = _iterator(config, design, **kwargs)
  with_worker = _take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  with_worker += _take(iterator, 2)
  iterator.close()
  restored = _iterator(config, design, **kwargs)
  restored.set_state(state)
  resumed = _take(restored, 2)
  restored.close()
  for want, got in zip(in_process, with_worker):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  for want, got in zip(in_process[2:], resumed):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_float16_conversion_is_exact():
  every_half = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)
  converted = np.zeros((256, 256), np.float32)
  tables._convert_into(converted, every_half)  # pylint: disable=protected-access
  np.testing.assert_array_equal(converted, every_half.astype(np.float32))  # NaNs equal too


def two_process_sharding(shape, order=None):
  """The batch sharding over a mesh `shape` of 8 devices, 4 per process, laid out
  in `order` (device ids in mesh order)."""
  devices = [FakeHostDevice(id=i, process_index=i // 4) for i in range(8)]
  grid = np.array([devices[i] for i in (order or range(8))]).reshape(shape)
  mesh = Mesh(grid, sharding.DEFAULT_MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return input_pipeline.batch_sharding(mesh, ('data', 'fsdp'), 16)


def test_process_batch_rows_come_from_the_sharding():
  assert input_pipeline.process_batch_rows(two_process_sharding((8, 1, 1)), 16) == {
      0: (0, 8), 1: (8, 16)}
  # Tensor parallel within each host, data parallel across the two.
  assert input_pipeline.process_batch_rows(two_process_sharding((2, 1, 4)), 16) == {
      0: (0, 8), 1: (8, 16)}
  # Process 1's devices first: it holds the first rows.
  order = [4, 5, 6, 7, 0, 1, 2, 3]
  assert input_pipeline.process_batch_rows(two_process_sharding((8, 1, 1), order), 16) == {
      0: (8, 16), 1: (0, 8)}


@pytest.mark.parametrize('shape, order', [
    ((1, 1, 8), None),                          # the batch replicated on both hosts
    ((2, 1, 4), [0, 1, 4, 5, 2, 3, 6, 7]),      # a tensor axis spanning the hosts
])
def test_bad_batch_layout_is_refused_naming_mesh_and_processes(shape, order):
  with pytest.raises(ValueError, match=r"does not split over the 2 processes: mesh "
                     r"\{'data': \d, 'fsdp': 1, 'tensor': \d\}.*process 0: rows .*process 1"):
    input_pipeline.process_batch_rows(two_process_sharding(shape, order), 16)


def test_tables_of_one_process_share_a_cached_images_table(data_config, caplog):
  """The train pipeline and each evaluator open the images table: it is read
  into memory once while any of them holds it."""
  source = tfds.data_source('pipeline_test_images/full', split='train',
                            data_dir=data_config.data_dir)
  table = lambda regions=MAX_REGIONS: tables.ImageTable(source, regions, name='t',
                                                        with_class_probs=True, cache=True)
  first, second, fewer_regions = table(), table(), table(MAX_REGIONS - 1)
  indices = np.arange(3)
  with caplog.at_level(logging.INFO):
    batches = [t.gather(indices) for t in (first, second, fewer_regions)]
  assert sum('Caching images table' in r.getMessage() for r in caplog.records) == 2
  assert second._cached is first._cached and fewer_regions._cached is not first._cached
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)
