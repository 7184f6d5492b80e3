"""The tiny embedded world built with TFDS (ArrayRecord) and read back with `tfds.data_source`."""
import filecmp
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlpjax.data import build
from vlpjax.data import features_builder
from vlpjax.data import vlp_world
from vlpjax.data import vocab as vocab_lib
from vlpjax.data import world as world_lib

SIZE = 'tiny'
CONFIG = vlp_world.WORLD_SIZES[SIZE]


def _fresh_build(data_dir) -> dict[str, str]:
  # Forget the per-process caches so the build regenerates everything.
  world_lib.make_world.cache_clear()
  vocab_lib.world_vocab.cache_clear()
  return build.build(SIZE, os.fspath(data_dir))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tfds')
  _fresh_build(directory)
  return os.fspath(directory)


def source(data_dir, table, split):
  return tfds.data_source(f'vlp_world/{SIZE}_{table}', data_dir=data_dir, split=split)


@pytest.fixture(scope='module')
def images(data_dir):
  table = source(data_dir, 'images', vlp_world.IMAGES_SPLIT)
  return [table[i] for i in range(len(table))]


def text_rows(data_dir, table):
  return {split: [row for row in source(data_dir, table, split)] for split in world_lib.SPLITS}


def test_images_table_round_trips(images):
  assert len(images) == CONFIG.num_images
  expected = world_lib.World(CONFIG).image_examples(range(CONFIG.num_images))
  for i, (record, want) in enumerate(zip(images, expected)):
    assert record['index'] == i  # record i has index i
    assert record['image_id'].decode() == want['image_id']
    n = record['num_boxes']
    assert CONFIG.min_regions <= n <= CONFIG.num_regions
    for key, dtype, shape in (
        ('boxes', np.float32, (n, 4)), ('features', np.float16, (n, CONFIG.feature_dim)),
        ('object_ids', np.int32, (n,)), ('object_conf', np.float32, (n,)),
        ('attr_ids', np.int32, (n,)), ('attr_conf', np.float32, (n,)),
        ('class_probs', np.float16, (n, len(world_lib.OBJECT_CLASSES)))):
      assert record[key].dtype == dtype and record[key].shape == shape, key
      np.testing.assert_array_equal(record[key], want[key], err_msg=key)
    assert (record['image_h'], record['image_w']) == (want['image_h'], want['image_w'])


def test_text_tables_point_at_images(data_dir, images):
  image_ids = [r['image_id'] for r in images]
  split_images = {}
  for table in ('captions', 'vqa', 'refexp'):
    rows = text_rows(data_dir, table)
    for split, split_rows in rows.items():
      assert split_rows, (table, split)
      for row in split_rows:
        assert 0 <= row['image_index'] < len(images)
        assert row['image_id'] == image_ids[row['image_index']]
      split_images.setdefault(split, set()).update(r['image_index'] for r in split_rows)
  for split, split_rows in text_rows(data_dir, 'nlvr2').items():
    for row in split_rows:
      for side in ('left', 'right'):
        assert row[f'{side}_image_id'] == image_ids[row[f'{side}_image_index']]
        assert row[f'{side}_image_index'] in split_images[split]
      assert row['label'] in (0, 1)
  train, validation, test = (split_images[s] for s in world_lib.SPLITS)
  assert not (train & test or train & validation or validation & test)
  # Several captions per image in the retrieval (test) split.
  test_captions = [r['image_index'] for r in text_rows(data_dir, 'captions')['test']]
  assert len(test_captions) > len(set(test_captions))


def test_vqa_scores_and_answer_vocab(data_dir):
  builder = tfds.builder(f'vlp_world/{SIZE}_vqa', data_dir=data_dir)
  answers = vlp_world.answer_vocab(builder)
  assert answers == list(world_lib.ANSWERS)
  assert answers == vlp_world.answer_vocab(vlp_world.dataset_dir(data_dir, SIZE, 'vqa'))
  for rows in text_rows(data_dir, 'vqa').values():
    for row in rows:
      assert len(row['answers']) == 10
      counts = {}
      for answer in row['answers']:
        counts[answer.decode()] = counts.get(answer.decode(), 0) + 1
      got = {answers[label]: score for label, score in zip(row['answer_labels'],
                                                           row['answer_scores'])}
      assert got == pytest.approx({a: min(1.0, 0.3 * c) for a, c in counts.items()})


def test_refexp_targets_have_a_detector_box(data_dir, images):
  rows = [r for split_rows in text_rows(data_dir, 'refexp').values() for r in split_rows]
  found = 0
  for row in rows:
    image = images[row['image_index']]
    box = row['target_box']
    assert box.shape == (4,) and box.dtype == np.float32
    assert 0 <= box[0] < box[2] <= image['image_w'] and 0 <= box[1] < box[3] <= image['image_h']
    found += world_lib.box_iou(image['boxes'], box[None]).max() >= 0.5
  assert found == len(rows)


def test_stored_vocab_tokenizes_every_table(data_dir):
  path = vlp_world.vocab_path(data_dir, SIZE)
  for table in vlp_world.TABLES:
    assert filecmp.cmp(path, vlp_world.vocab_path(data_dir, SIZE, table), shallow=False)
  tokenizer = vocab_lib.load_tokenizer(path)
  assert tokenizer.token_to_id('[PAD]') == 0 and tokenizer.token_to_id('[MASK]') == 4
  unk = tokenizer.token_to_id('[UNK]')
  for table, field in (('captions', 'text'), ('vqa', 'question'), ('refexp', 'text'),
                       ('nlvr2', 'text')):
    for rows in text_rows(data_dir, table).values():
      for row in rows:
        assert unk not in tokenizer.encode(row[field].decode()).ids


def test_vcr_table_is_the_worlds_and_refers_to_gt_regions(data_dir):
  world = world_lib.make_world(CONFIG)
  gt = source(data_dir, 'gt_images', vlp_world.IMAGES_SPLIT)
  tokenizer = vocab_lib.load_tokenizer(vlp_world.vocab_path(data_dir, SIZE))
  unk = tokenizer.token_to_id('[UNK]')
  for split, rows in text_rows(data_dir, 'vcr').items():
    assert [r['annot_id'].decode() for r in rows] == [r['annot_id'] for r in world.vcr[split]]
    for row, want in zip(rows, world.vcr[split]):
      for key in world_lib.VCR_JSON_FIELDS + ('image_id',):
        assert row[key].decode() == want[key], key
      assert (row['answer_label'], row['rationale_label']) == (
          want['answer_label'], want['rationale_label'])
      objects = json.loads(row['objects'])
      # Region k of the gt_images table is object k.
      assert gt[row['image_index']]['num_boxes'] == len(objects)
      for field in ('question', 'answer_choices', 'rationale_choices'):
        token_lists = json.loads(row[field])
        for tokens in ([token_lists] if field == 'question' else token_lists):
          words = [t for t in tokens if isinstance(t, str)]
          assert all(0 <= i < len(objects) for t in tokens if isinstance(t, list) for i in t)
          assert unk not in tokenizer.encode(' '.join(words)).ids


def test_metadata_and_label_files(data_dir):
  builder = tfds.builder(f'vlp_world/{SIZE}_images', data_dir=data_dir)
  assert builder.info.metadata['num_object_classes'] == len(world_lib.OBJECT_CLASSES)
  assert builder.info.metadata['num_attributes'] == len(world_lib.COLOURS)
  assert builder.info.features['features'].shape == (None, CONFIG.feature_dim)
  with open(os.path.join(builder.data_dir, vlp_world.OBJECTS_FILE)) as f:
    assert f.read().splitlines() == list(world_lib.OBJECT_CLASSES)
  with pytest.raises(FileNotFoundError, match='build the table first'):
    vlp_world.vocab_path(data_dir, 'default')


def test_tables_store_the_fingerprint_of_their_images(data_dir, images):
  """What the pipeline checks a text table against (the images' ordered ids)."""
  fingerprint = features_builder.image_ids_fingerprint([r['image_id'].decode() for r in images])
  for table in vlp_world.TABLES:
    metadata = features_builder.stored_metadata(
        tfds.builder(f'vlp_world/{SIZE}_{table}', data_dir=data_dir))
    key = (features_builder.IMAGE_IDS_FINGERPRINT if table == 'images'
           else features_builder.IMAGES_FINGERPRINT)
    assert metadata[key] == fingerprint, table


def test_rebuild_gives_identical_bytes(data_dir, tmp_path):
  again = _fresh_build(tmp_path)
  for table in vlp_world.TABLES:
    first = vlp_world.dataset_dir(data_dir, SIZE, table)
    names = sorted(n for n in os.listdir(first) if 'array_record' in n or n.endswith('.txt'))
    assert any('array_record' in n for n in names)
    assert names == sorted(n for n in os.listdir(again[table])
                           if 'array_record' in n or n.endswith('.txt'))
    match, mismatch, errors = filecmp.cmpfiles(first, again[table], names, shallow=False)
    assert not mismatch and not errors, (table, mismatch, errors)
