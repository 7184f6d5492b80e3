"""TFDS builders for real-format files, on tiny fixtures written in those formats."""
import json
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import real_format_fixtures as fx
from configs import lxmert
from vlpjax import train
from vlpjax.data import annotations_builder as ab
from vlpjax.data import features_builder as fb
from vlpjax.data import formats
from vlpjax.data import input_pipeline
from vlpjax.data import vlp_world

# COCO ids -> their feature-file names, as in LXMERT's mscoco TSVs.
COCO = {9: 'train2014', 25: 'train2014', 30: 'train2014', 42: 'val2014', 73: 'val2014'}
IDS = [f'COCO_{split}_{coco_id:012d}' for coco_id, split in COCO.items()]


def build(builder_cls, config, data_dir, manual_dir):
  builder = builder_cls(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def read_all(name, data_dir, split='train'):
  source = tfds.data_source(name, data_dir=str(data_dir))[split]
  return [source[i] for i in range(len(source))]


def side_file(builder, name):
  return open(os.path.join(builder.data_dir, name)).read()


@pytest.fixture(scope='module')
def coco_table(tmp_path_factory):
  """An LXMERT-TSV images table of the five COCO images (two files, 2 shards)."""
  root = tmp_path_factory.mktemp('coco')
  manual = root / 'manual'
  manual.mkdir()
  images = fx.random_images(0, IDS)
  fx.write_lxmert_tsv(manual / 'train2014_obj36.tsv', images[:3])
  fx.write_lxmert_tsv(manual / 'val2014_obj36.tsv', images[3:])
  config = fb.ImagesConfig(name='tiny_coco', sources=('train2014_obj36.tsv', 'val2014_obj36.tsv'),
                           feature_dim=fx.FEATURE_DIM, images_per_shard=3)
  builder = build(fb.LxmertTsv, config, root / 'data', manual)
  return root, images, builder


def test_lxmert_tsv_table_in_index_order(coco_table):
  root, images, builder = coco_table
  assert builder.info.splits['train'].num_examples == 5
  assert builder.info.splits['train'].num_shards == 2
  rows = read_all('lxmert_tsv/tiny_coco', root / 'data')
  assert [row['index'] for row in rows] == list(range(5))
  for row, image in zip(rows, images):
    assert row['image_id'].decode() == image['image_id']
    assert row['num_boxes'] == len(image['boxes'])
    assert (row['image_h'], row['image_w']) == (image['image_h'], image['image_w'])
    assert row['features'].dtype == np.float16
    np.testing.assert_allclose(row['features'], image['features'], rtol=1e-3)
    np.testing.assert_array_equal(row['boxes'], image['boxes'])
    np.testing.assert_array_equal(row['object_ids'], image['objects_id'])
    np.testing.assert_array_equal(row['attr_conf'], image['attrs_conf'])
    assert 'class_probs' not in row
  assert side_file(builder, fb.IMAGE_IDS_FILE).splitlines() == IDS
  assert json.loads(side_file(builder, fb.REPORT_FILE))['num_skipped'] == 0
  assert fb.read_image_ids('lxmert_tsv/tiny_coco', root / 'data') == IDS


def test_malformed_tsv_raises_or_is_skipped_and_reported(tmp_path):
  images = fx.random_images(1, ['a', 'b', 'c', 'd'])
  rows = [fx.lxmert_tsv_row(im) for im in images]
  fields = rows[1].split('\t')
  rows[1] = '\t'.join(fields[:8] + [fields[8][:10]])  # truncated inside the boxes field
  nan = dict(images[2], features=images[2]['features'].copy())
  nan['features'][0, 0] = np.nan
  rows[2] = fx.lxmert_tsv_row(nan)
  fx.write_lxmert_tsv(tmp_path / 'bad.tsv', [], rows=rows)
  config = dict(name='bad', sources=('bad.tsv',), feature_dim=fx.FEATURE_DIM)
  with pytest.raises(formats.FormatError, match=r'bad\.tsv:2: truncated or malformed row'):
    build(fb.LxmertTsv, fb.ImagesConfig(**config), tmp_path / 'data', tmp_path)
  builder = build(fb.LxmertTsv, fb.ImagesConfig(on_error='skip', **config),
                  tmp_path / 'data', tmp_path)
  rows = read_all('lxmert_tsv/bad', tmp_path / 'data')
  assert [(r['index'], r['image_id']) for r in rows] == [(0, b'a'), (1, b'd')]
  report = json.loads(side_file(builder, fb.REPORT_FILE))
  assert report['num_skipped'] == 2 and report['on_error'] == 'skip'
  assert report['by_reason'] == {'truncated row': 1, 'non-finite features': 1}
  assert report['skipped'][1]['where'].endswith('bad.tsv:3 (image c)')


def test_uniter_lmdb_table_with_image_sizes(tmp_path):
  images = fx.random_images(2, IDS[:3])
  fx.write_uniter_dir(str(tmp_path / 'coco_train2014'), images, compress=False)
  fx.write_coco_captions(str(tmp_path / 'captions_train2014.json'), 'train2014',
                         {9: ['x'], 25: ['y'], 30: ['z']})
  config = fb.ImagesConfig(name='tiny_coco', sources=('coco_train2014',),
                           feature_dim=fx.FEATURE_DIM, num_classes=fx.NUM_CLASSES,
                           image_sizes='captions_train2014.json')
  builder = build(fb.UniterLmdb, config, tmp_path / 'data', tmp_path)
  assert builder.info.features['class_probs'].shape == (None, fx.NUM_CLASSES)
  rows = read_all('uniter_lmdb/tiny_coco', tmp_path / 'data')
  by_id = {row['image_id'].decode(): row for row in rows}
  assert sorted(by_id) == sorted(IDS[:3])
  for image in images:
    row = by_id[image['image_id']]
    assert (row['image_h'], row['image_w']) == (48, 64)
    np.testing.assert_allclose(row['boxes'], image['boxes'], atol=0.05)
    np.testing.assert_allclose(row['class_probs'], image['class_probs'], atol=1e-3)


def test_region_npy_and_vilbert_tables(tmp_path):
  images = fx.random_images(3, IDS[:2])
  fx.write_npz_folder(str(tmp_path / 'npz'), images)
  build(fb.RegionNpy, fb.ImagesConfig(name='npz', sources=('npz',), feature_dim=fx.FEATURE_DIM),
        tmp_path / 'data', tmp_path)
  rows = read_all('region_npy/npz', tmp_path / 'data')
  assert [r['image_id'].decode() for r in rows] == IDS[:2]
  np.testing.assert_array_equal(rows[1]['boxes'], images[1]['boxes'])

  fx.write_vilbert_lmdb(str(tmp_path / 'vilbert.lmdb'), images)
  config = dict(name='vilbert', sources=('vilbert.lmdb',), feature_dim=fx.FEATURE_DIM)
  with pytest.raises(formats.PickleRefusedError, match='trust_pickle=True'):
    build(fb.VilbertLmdb, fb.ImagesConfig(**config), tmp_path / 'data', tmp_path)
  build(fb.VilbertLmdb, fb.ImagesConfig(trust_pickle=True, **config), tmp_path / 'data', tmp_path)
  rows = read_all('vilbert_lmdb/vilbert', tmp_path / 'data')
  np.testing.assert_allclose(rows[0]['features'], images[0]['features'], rtol=1e-3)


def test_butd_hdf5_table_from_the_command_line(tmp_path, capsys):
  images = [fx.random_image(np.random.default_rng(i), str(coco_id), num_boxes=2 + i)
            for i, coco_id in enumerate(COCO)]
  fx.write_butd_hdf5(str(tmp_path / 'train36.hdf5'), images[:3], adaptive=True)
  fx.write_butd_hdf5(str(tmp_path / 'val36.hdf5'), images[3:], index='json', adaptive=True)
  fb.main(['butd_hdf5', '--name=tiny', '--sources', 'train36.hdf5', 'val36.hdf5',
           f'--data_dir={tmp_path / "data"}', f'--manual_dir={tmp_path}',
           f'--feature_dim={fx.FEATURE_DIM}'])
  assert 'butd_hdf5/tiny' in capsys.readouterr().out
  rows = read_all('butd_hdf5/tiny', tmp_path / 'data')
  # Each file's rows in its own row order (the fixture writes them reversed).
  assert [r['image_id'].decode() for r in rows] == ['30', '25', '9', '73', '42']
  by_id = {image['image_id']: image for image in images}
  for row in rows:
    image = by_id[row['image_id'].decode()]
    assert (row['image_h'], row['image_w']) == (48, 64)
    np.testing.assert_allclose(row['boxes'], image['boxes'], rtol=1e-6)
    np.testing.assert_allclose(row['features'], image['features'], rtol=1e-3)


def text_config(root, **kwargs):
  return ab.TextConfig(images='lxmert_tsv/tiny_coco', images_data_dir=str(root / 'data'), **kwargs)


def test_karpathy_captions_refer_to_image_rows(coco_table, tmp_path):
  root, _, _ = coco_table
  fx.write_karpathy(str(tmp_path / 'dataset_coco.json'), [
      ('train2014', 9, 'train', ['A dog.', 'A brown dog.']),
      ('val2014', 42, 'restval', ['Two cats.']),
      ('train2014', 25, 'val', ['A bus.']),
      ('val2014', 73, 'test', ['A tree.', 'Green tree.']),
  ])
  builder = build(ab.CocoCaptions, text_config(root, name='tiny_karpathy'),
                  tmp_path / 'data', tmp_path)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 3, 'validation': 1, 'test': 2}
  train = read_all('coco_captions/tiny_karpathy', tmp_path / 'data', 'train')
  assert [(r['caption_id'], r['text'], r['image_index'], r['image_id']) for r in train] == [
      (0, b'A dog.', 0, IDS[0].encode()), (1, b'A brown dog.', 0, IDS[0].encode()),
      (2, b'Two cats.', 3, IDS[3].encode())]
  test = read_all('coco_captions/tiny_karpathy', tmp_path / 'data', 'test')
  assert {r['image_index'] for r in test} == {4}


def test_official_captions_and_missing_images(coco_table, tmp_path):
  root, _, _ = coco_table
  fx.write_coco_captions(str(tmp_path / 'captions_train2014.json'), 'train2014',
                         {9: ['a'], 30: ['b', 'c'], 999: ['no features']})
  fx.write_coco_captions(str(tmp_path / 'captions_val2014.json'), 'val2014', {42: ['d']},
                         first_caption_id=100)
  config = dict(name='tiny_official', caption_source='official')
  with pytest.raises(formats.FormatError, match=r'caption 4: missing image: 999'):
    build(ab.CocoCaptions, text_config(root, **config), tmp_path / 'data', tmp_path)
  builder = build(ab.CocoCaptions, text_config(root, on_error='skip', **config),
                  tmp_path / 'data', tmp_path)
  train = read_all('coco_captions/tiny_official', tmp_path / 'data', 'train')
  assert [(r['caption_id'], r['image_index']) for r in train] == [(1, 0), (2, 2), (3, 2)]
  report = json.loads(side_file(builder, fb.REPORT_FILE))
  assert report['num_skipped'] == 1 and report['by_reason'] == {'missing image': 1}


def test_vg_region_descriptions(tmp_path):
  images = fx.random_images(4, ['1', '2'])
  fx.write_lxmert_tsv(tmp_path / 'vg_gqa_obj36.tsv', images)
  build(fb.LxmertTsv, fb.ImagesConfig(name='tiny_vg', sources=('vg_gqa_obj36.tsv',),
                                      feature_dim=fx.FEATURE_DIM), tmp_path / 'data', tmp_path)
  fx.write_vg_regions(str(tmp_path / 'region_descriptions.json'),
                      {2: ['a red car', 'tree'], 1: ['sky']})
  build(ab.VgRegionDescriptions, ab.TextConfig(name='tiny_regions', images='lxmert_tsv/tiny_vg'),
        tmp_path / 'data', tmp_path)
  with pytest.raises(FileNotFoundError, match="images table 'lxmert_tsv/absent' is not built"):
    build(ab.VgRegionDescriptions, ab.TextConfig(name='tiny_orphans', images='lxmert_tsv/absent'),
          tmp_path / 'data', tmp_path)
  rows = read_all('vg_region_descriptions/tiny_regions', tmp_path / 'data')
  assert [(r['caption_id'], r['text'], r['image_index']) for r in rows] == [
      (1, b'a red car', 1), (2, b'tree', 1), (3, b'sky', 0)]


def vqa_questions(coco_ids, first_id):
  """Questions with answers chosen so that the vocabulary threshold matters."""
  answers = [['yes'] * 10, ['two'] * 4 + ['2'] * 3 + ['3'] * 3,
             ['Yes'] * 6 + ['no'] * 4, ['a dog'] * 10]
  return [(first_id + k, coco_id, f'Question {k}?', answers[k % 4])
          for k, coco_id in enumerate(coco_ids)]


def test_vqa_soft_scores_vocab_and_missing_images(coco_table, tmp_path):
  root, _, _ = coco_table
  train = vqa_questions([9, 9, 25, 30, 30, 25], 1000)
  fx.write_vqa(str(tmp_path), 'train2014', train)
  fx.write_vqa(str(tmp_path), 'val2014', vqa_questions([42, 73, 555], 2000))
  config = dict(name='tiny_vqa', min_answer_count=2)
  with pytest.raises(formats.FormatError, match=r'question 2002: missing image: 555'):
    build(ab.VqaV2, text_config(root, **config), tmp_path / 'data', tmp_path)
  builder = build(ab.VqaV2, text_config(root, on_error='skip', **config),
                  tmp_path / 'data', tmp_path)
  # multiple-choice answers of train: yes x2, 2 x2 ('two' normalised), yes, dog.
  vocab = ab.answer_vocab('vqa_v2/tiny_vqa', str(tmp_path / 'data'))
  assert vocab == ['yes', '2'] == side_file(builder, ab.ANSWERS_FILE).split()
  assert ab.answer_vocab(builder) == vocab
  rows = read_all('vqa_v2/tiny_vqa', tmp_path / 'data', 'train')
  assert len(rows) == 6 and [r['image_index'] for r in rows] == [0, 0, 1, 2, 2, 1]
  second = rows[1]
  assert second['question'] == b'Question 1?' and second['question_id'] == 1001
  assert [a.decode() for a in second['answers']] == ['two'] * 4 + ['2'] * 3 + ['3'] * 3
  np.testing.assert_array_equal(second['answer_labels'], [1])  # '3' is not in the vocabulary
  np.testing.assert_allclose(second['answer_scores'], [1.0])
  third = rows[2]
  np.testing.assert_array_equal(third['answer_labels'], [0])
  np.testing.assert_allclose(third['answer_scores'], [1.0])
  assert len(rows[3]['answer_labels']) == 0  # 'dog' is below the threshold
  validation = read_all('vqa_v2/tiny_vqa', tmp_path / 'data', 'validation')
  assert [r['question_id'] for r in validation] == [2000, 2001]
  assert json.loads(side_file(builder, fb.REPORT_FILE))['num_skipped'] == 1


def test_vqa_question_without_annotation(coco_table, tmp_path):
  root, _, _ = coco_table
  fx.write_vqa(str(tmp_path), 'train2014', vqa_questions([9, 25], 1))
  annotations_path = tmp_path / 'v2_mscoco_train2014_annotations.json'
  annotations = json.loads(annotations_path.read_text())
  annotations['annotations'].pop(1)
  annotations_path.write_text(json.dumps(annotations))
  config = text_config(root, name='vqa_train', splits=('train',), min_answer_count=1)
  with pytest.raises(formats.FormatError, match='question 2: missing annotation'):
    build(ab.VqaV2, config, tmp_path / 'data', tmp_path)


# ---------------------------------------------------------------------------
# Through the command lines, as a user builds tables.


def build_images(root, name, *args):
  """`python -m vlpjax.data.features_builder lxmert_tsv` of files in `root`."""
  fb.main(['lxmert_tsv', '--name', name, '--data_dir', str(root / 'data'), '--manual_dir',
           str(root), '--feature_dim', str(fx.FEATURE_DIM), '--sources', *args])


def build_captions(root, name, *args):
  """`python -m vlpjax.data.annotations_builder coco_captions` (Karpathy) against
  the images table lxmert_tsv/tiny_coco."""
  ab.main(['coco_captions', '--config', name, '--images', 'lxmert_tsv/tiny_coco', '--data_dir',
           str(root / 'data'), '--manual_dir', str(root), *args])


def table_dir(root, dataset, name):
  return root / 'data' / dataset / name / '1.0.0'


def write_coco_images(root, images):
  """The five COCO images in LXMERT's two TSVs (train2014: 3, val2014: 2)."""
  fx.write_lxmert_tsv(root / 'train2014_obj36.tsv', images[:3])
  fx.write_lxmert_tsv(root / 'val2014_obj36.tsv', images[3:])


def write_karpathy_train(path, coco_ids):
  """A Karpathy file with one training caption per image."""
  return fx.write_karpathy(str(path), [(COCO[i], i, 'train', [f'Image {i}.'])
                                       for i in coco_ids])


def test_rebuilding_an_images_table_under_its_name_is_refused_unless_overwritten(
    tmp_path, capsys):
  images = fx.random_images(11, IDS)
  fx.write_lxmert_tsv(tmp_path / 'old.tsv', images[:2])
  fx.write_lxmert_tsv(tmp_path / 'new.tsv', images[2:])
  build_images(tmp_path, 'tiny_coco', 'old.tsv')
  build_images(tmp_path, 'tiny_coco', 'old.tsv')  # the same build again reuses the table
  with pytest.raises(fb.TableExistsError) as error:
    build_images(tmp_path, 'tiny_coco', 'new.tsv')
  message = str(error.value)
  for part in (str(table_dir(tmp_path, 'lxmert_tsv', 'tiny_coco')), str(tmp_path / 'old.tsv'),
               "sources: ['old.tsv'] -> ['new.tsv']", '--overwrite'):
    assert part in message
  assert fb.read_image_ids('lxmert_tsv/tiny_coco', tmp_path / 'data') == IDS[:2]
  capsys.readouterr()
  build_images(tmp_path, 'tiny_coco', 'new.tsv', '--overwrite')
  assert 'lxmert_tsv/tiny_coco/1.0.0: 3 images' in capsys.readouterr().out
  assert fb.read_image_ids('lxmert_tsv/tiny_coco', tmp_path / 'data') == IDS[2:]
  rows = read_all('lxmert_tsv/tiny_coco', tmp_path / 'data')
  assert [r['image_id'].decode() for r in rows] == IDS[2:]
  metadata_file = table_dir(tmp_path, 'lxmert_tsv', 'tiny_coco') / 'metadata.json'
  metadata = json.loads(metadata_file.read_text())
  assert metadata[fb.SOURCES_KEY] == [str(tmp_path / 'new.tsv')]


def test_rebuilding_a_text_table_under_its_name_is_refused_unless_overwritten(tmp_path):
  write_coco_images(tmp_path, fx.random_images(12, IDS))
  build_images(tmp_path, 'tiny_coco', 'train2014_obj36.tsv', 'val2014_obj36.tsv')
  write_karpathy_train(tmp_path / 'dataset_coco.json', [9, 25])
  write_karpathy_train(tmp_path / 'more.json', [9, 25, 30, 42])
  build_captions(tmp_path, 'caps')
  with pytest.raises(fb.TableExistsError) as error:
    build_captions(tmp_path, 'caps', '--file', 'karpathy=more.json')
  assert str(table_dir(tmp_path, 'coco_captions', 'caps')) in str(error.value)
  assert str(tmp_path / 'dataset_coco.json') in str(error.value)
  assert len(read_all('coco_captions/caps', tmp_path / 'data')) == 2
  build_captions(tmp_path, 'caps', '--file', 'karpathy=more.json', '--overwrite')
  assert len(read_all('coco_captions/caps', tmp_path / 'data')) == 4


def test_pipeline_refuses_text_built_against_an_images_table_rebuilt_since(tmp_path):
  write_coco_images(tmp_path, fx.random_images(13, IDS))
  build_images(tmp_path, 'tiny_coco', 'train2014_obj36.tsv', 'val2014_obj36.tsv')
  write_karpathy_train(tmp_path / 'dataset_coco.json', list(COCO))
  build_captions(tmp_path, 'caps')
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nimage\n')
  config = input_pipeline.default_data_config()
  config.update(name='coco', data_dir=str(tmp_path / 'data'), vocab_file=str(vocab),
                images_dataset='lxmert_tsv/tiny_coco', captions_dataset='coco_captions/caps',
                max_text_len=8, max_regions=4, prefetch_batches=0)
  batches = lambda: input_pipeline.make_pretraining_iterator(config, 'lxmert',
                                                             global_batch_size=2, seed=0)
  next(batches())
  # The images table rebuilt under its name, its files in the other order: the
  # captions' image rows now hold other images.
  shutil.rmtree(table_dir(tmp_path, 'lxmert_tsv', 'tiny_coco'))
  build_images(tmp_path, 'tiny_coco', 'val2014_obj36.tsv', 'train2014_obj36.tsv')
  with pytest.raises(ValueError, match=r'coco_captions/caps was built against other images '
                     r'than the images table lxmert_tsv/tiny_coco .* rebuild coco_captions/caps'):
    batches()
  # A text table built before fingerprints were stored: its rows' image ids are compared.
  metadata_file = table_dir(tmp_path, 'coco_captions', 'caps') / 'metadata.json'
  metadata = json.loads(metadata_file.read_text())
  del metadata[fb.IMAGES_FINGERPRINT]
  metadata_file.write_text(json.dumps(metadata))
  with pytest.raises(ValueError, match=r'coco_captions/caps does not match the images table '
                     rf"lxmert_tsv/tiny_coco: 5 of 5 rows .* row 0: image '{IDS[0]}', but row 0 of "
                     rf"lxmert_tsv/tiny_coco is '{IDS[3]}'"):
    batches()
  build_captions(tmp_path, 'caps', '--overwrite')
  next(batches())


def test_label_ids_past_the_model_heads_fail_before_compiling(tmp_path):
  images = fx.random_images(14, IDS)
  images[1]['objects_id'][0] = 1599  # LXMERT's TSVs: 1600 object and 400 attribute labels
  images[3]['attrs_id'][1] = 399
  write_coco_images(tmp_path, images)
  build_images(tmp_path, 'tiny_coco', 'train2014_obj36.tsv', 'val2014_obj36.tsv')
  write_karpathy_train(tmp_path / 'dataset_coco.json', list(COCO))
  build_captions(tmp_path, 'caps')
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nimage\n')
  config = lxmert.get_config('tiny')  # 16 object and 8 attribute labels
  config.data.update(name='coco', data_dir=str(tmp_path / 'data'), vocab_file=str(vocab),
                     images_dataset='lxmert_tsv/tiny_coco', captions_dataset='coco_captions/caps',
                     qa=False, max_text_len=8, max_regions=4)
  config.pretrain.tasks = ('mlm', 'matched', 'obj', 'attr', 'feat')
  config.model.feature_dim = fx.FEATURE_DIM
  config.train.update(global_batch_size=8, num_steps=1)
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if 'compile' in event:
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError, match=r'config\.model\.num_object_labels=16 is too small: .*'
                       r'lxmert_tsv/tiny_coco.* object ids up to 1599'):
      train.train_and_evaluate(config, str(tmp_path / 'run'))
    config.model.num_object_labels = 1600
    with pytest.raises(ValueError, match=r'config\.model\.num_attr_labels=8 is too small: .*'
                       r'attribute ids up to 399'):
      train.train_and_evaluate(config, str(tmp_path / 'run'))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiled


def test_ingest_report_in_both_modes_grouped_by_reason(tmp_path):
  images = fx.random_images(15, ['a', 'b', 'c', 'd', 'e'])
  for image in images[2:4]:
    image['features'] = image['features'].copy()
    image['features'][0, 0] = np.nan
  rows = [fx.lxmert_tsv_row(image) for image in images + images[:2]]  # a, b again
  fx.write_lxmert_tsv(tmp_path / 'mixed.tsv', [], rows=rows)
  report_file = table_dir(tmp_path, 'lxmert_tsv', 'mixed') / fb.REPORT_FILE
  failed_report_file = report_file.parent.parent / fb.REPORT_FILE
  # on_error raise: the build stops at the first bad row; the report names it.
  with pytest.raises(formats.FormatError, match=r'mixed\.tsv:3 \(image c\): features: non-finite'):
    build_images(tmp_path, 'mixed', 'mixed.tsv')
  report = json.loads(failed_report_file.read_text())
  assert report['on_error'] == 'raise' and report['num_skipped'] == 0
  assert report['error']['kind'] == 'non-finite features'
  assert report['error']['where'].endswith('mixed.tsv:3 (image c)')
  # on_error skip: every bad row counted, by the kind of problem (not by message).
  build_images(tmp_path, 'mixed', 'mixed.tsv', '--on_error', 'skip')
  report = json.loads(report_file.read_text())
  assert report['num_skipped'] == 4
  assert report['by_reason'] == {'non-finite features': 2, 'duplicate image id': 2}
  assert not failed_report_file.exists()  # the failed build's report is gone
  assert fb.read_image_ids('lxmert_tsv/mixed', tmp_path / 'data') == ['a', 'b', 'e']
  # on_error raise with good rows only: a report with nothing in it.
  fx.write_lxmert_tsv(tmp_path / 'good.tsv', images[:2])
  build_images(tmp_path, 'good', 'good.tsv')
  report = json.loads((table_dir(tmp_path, 'lxmert_tsv', 'good') / fb.REPORT_FILE).read_text())
  assert (report['on_error'], report['num_skipped'], report['error']) == ('raise', 0, None)


def test_ingest_report_when_every_row_is_bad(tmp_path):
  images = fx.random_images(16, ['a', 'b'])
  rows = [fx.lxmert_tsv_row(image)[:50] for image in images]  # both truncated
  fx.write_lxmert_tsv(tmp_path / 'bad.tsv', [], rows=rows)
  with pytest.raises(ValueError, match=r"no valid images .*2 skipped.*'truncated row': 2") as error:
    build_images(tmp_path, 'bad', 'bad.tsv', '--on_error', 'skip')
  report_file = tmp_path / 'data' / 'lxmert_tsv' / 'bad' / fb.REPORT_FILE
  assert f'ingest report: {report_file}' in error.value.__notes__
  report = json.loads(report_file.read_text())
  assert report['num_skipped'] == 2 and report['by_reason'] == {'truncated row': 2}
  assert not table_dir(tmp_path, 'lxmert_tsv', 'bad').exists()
  # A text table none of whose captions has its image in the images table.
  write_coco_images(tmp_path, fx.random_images(17, IDS))
  build_images(tmp_path, 'tiny_coco', 'train2014_obj36.tsv', 'val2014_obj36.tsv')
  fx.write_karpathy(str(tmp_path / 'dataset_coco.json'),
                    [('train2014', 7, 'train', ['No features.']),
                     ('train2014', 8, 'train', ['None either.'])])
  with pytest.raises(ValueError, match=r"split 'train' has no examples .*'missing image': 2"):
    build_captions(tmp_path, 'orphans', '--on_error', 'skip')
  report = json.loads((tmp_path / 'data' / 'coco_captions' / 'orphans' /
                       fb.REPORT_FILE).read_text())
  assert report['by_reason'] == {'missing image': 2}


def test_unprepared_builders_leave_no_temporary_directory(tmp_path, monkeypatch):
  """TFDS makes a temporary directory to look up an unprepared dataset's info
  on its bucket, and keeps it; these tables are local, so none is made."""
  made = []
  real_mkdtemp = tempfile.mkdtemp
  monkeypatch.setattr(tempfile, 'mkdtemp', lambda *a, **k: made.append(a) or real_mkdtemp(*a, **k))
  builders = (fb.LxmertTsv(data_dir=str(tmp_path)), ab.CocoCaptions(data_dir=str(tmp_path)),
              vlp_world.VlpWorld(config='tiny_images', data_dir=str(tmp_path)))
  assert not any(b.is_prepared() for b in builders)
  assert [type(b.info) for b in builders] == [fb.LocalDatasetInfo] * 3
  assert made == []
