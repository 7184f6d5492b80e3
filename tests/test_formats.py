"""Readers/validators of real region-feature formats, and VQA answer processing."""
import json
import os

import numpy as np
import pytest

import real_format_fixtures as fx
from vlpjax.data import annotations_builder as ab
from vlpjax.data import formats

IDS = ['COCO_train2014_000000000009', 'COCO_train2014_000000000025',
       'COCO_val2014_000000000042']


def decode_all(reader):
  return [reader.decode(key, raw) for key, raw in reader.iter_raw()]


def assert_matches(record, image, check_objects=True):
  assert record.image_id == image['image_id']
  assert (record.image_h, record.image_w) == (image['image_h'], image['image_w'])
  np.testing.assert_allclose(record.boxes, image['boxes'], rtol=1e-6)
  assert record.features.dtype == np.float16
  np.testing.assert_allclose(record.features, image['features'], rtol=1e-3)
  if check_objects:
    np.testing.assert_array_equal(record.object_ids, image['objects_id'])
    np.testing.assert_allclose(record.object_conf, image['objects_conf'])


def test_lxmert_tsv_round_trip(tmp_path):
  images = fx.random_images(0, IDS)
  reader = formats.LxmertTsvReader(fx.write_lxmert_tsv(tmp_path / 'a.tsv', images),
                                   fx.FEATURE_DIM)
  records = decode_all(reader)
  assert len(records) == 3
  for record, image in zip(records, images):
    assert_matches(record, image)
    np.testing.assert_array_equal(record.attr_ids, image['attrs_id'])
    assert record.class_probs is None
  # fetch() seeks back to the same line.
  keys = [key for key, _ in reader.iter_raw()]
  assert reader.decode(keys[2], reader.fetch(keys[2])).image_id == IDS[2]


def test_lxmert_tsv_streams_fields_past_csv_limit(tmp_path):
  image = fx.random_image(np.random.default_rng(1), 'big', num_boxes=36, feature_dim=2048)
  row = fx.lxmert_tsv_row(image)
  assert len(row.split('\t')[-1]) > 131072  # the csv module's default field limit
  reader = formats.LxmertTsvReader(fx.write_lxmert_tsv(tmp_path / 'big.tsv', [image]), 2048)
  assert_matches(decode_all(reader)[0], image)


def corrupt_rows(images):
  """Rows 2-5 broken in the four ways real files break; rows 1 and 6 good."""
  good = [fx.lxmert_tsv_row(im) for im in images]
  truncated = good[1][:len(good[1]) // 3]  # cut inside the boxes field
  fields = good[2].split('\t')
  fields[-1] = fx.b64(images[2]['features'][:, :-1])  # a float short per box
  short_b64 = '\t'.join(fields)
  nan = dict(images[3], features=images[3]['features'].copy())
  nan['features'][1, 2] = np.nan
  outside = dict(images[4], boxes=images[4]['boxes'] + np.float32(images[4]['image_w']))
  return [good[0], truncated, short_b64, fx.lxmert_tsv_row(nan),
          fx.lxmert_tsv_row(outside), good[5]]


@pytest.mark.parametrize('line, message', [
    (2, 'truncated or malformed row: expected 10 tab-separated fields'),
    (3, 'features: base64 decodes to'),
    (4, 'features: non-finite value'),
    (5, 'boxes: box 0'),
])
def test_lxmert_tsv_malformed_rows_name_file_and_line(tmp_path, line, message):
  images = fx.random_images(2, [f'im{i}' for i in range(6)])
  path = fx.write_lxmert_tsv(tmp_path / 'bad.tsv', [], rows=corrupt_rows(images))
  reader = formats.LxmertTsvReader(path, fx.FEATURE_DIM)
  (key, raw), = [(k, r) for k, r in reader.iter_raw() if k[0] == line]
  with pytest.raises(formats.FormatError) as error:
    reader.decode(key, raw)
  assert str(error.value).startswith(f'{path}:{line}')
  assert message in str(error.value)


def test_scan_skips_and_counts_malformed_rows(tmp_path):
  images = fx.random_images(2, [f'im{i}' for i in range(6)])
  path = fx.write_lxmert_tsv(tmp_path / 'bad.tsv', [], rows=corrupt_rows(images))
  reader = formats.LxmertTsvReader(path, fx.FEATURE_DIM)
  with pytest.raises(formats.FormatError, match=f'{path}:2'):
    formats.scan([reader], formats.ErrorReport('raise', 'test'))
  report = formats.ErrorReport('skip', 'test')
  seen = []
  kept = formats.scan([reader], report, on_record=lambda r: seen.append(r.image_id))
  assert seen == ['im0', 'im5'] and [key[0] for _, key in kept] == [1, 6]
  summary = report.to_dict()
  assert summary['num_skipped'] == 4
  assert [s['where'].split(' ')[0] for s in summary['skipped']] == [
      f'{path}:{line}' for line in (2, 3, 4, 5)]
  assert summary['by_reason'] == {'truncated row': 1, 'wrong features length': 1,
                                 'non-finite features': 1, 'box outside image': 1}
  report.write(tmp_path / 'report.json')
  assert json.loads((tmp_path / 'report.json').read_text())['num_skipped'] == 4


def test_scan_rejects_duplicate_image_ids(tmp_path):
  images = fx.random_images(3, ['a', 'b'])
  first = formats.LxmertTsvReader(fx.write_lxmert_tsv(tmp_path / '1.tsv', images), fx.FEATURE_DIM)
  second = formats.LxmertTsvReader(fx.write_lxmert_tsv(tmp_path / '2.tsv', images[1:]),
                                   fx.FEATURE_DIM)
  with pytest.raises(formats.FormatError, match=r"2\.tsv:1: duplicate image id 'b'.*1\.tsv:2"):
    formats.scan([first, second], formats.ErrorReport('raise', 'test'))


def test_error_report_rejects_unknown_mode():
  with pytest.raises(ValueError, match='on_error'):
    formats.ErrorReport('ignore', 'test')


@pytest.mark.parametrize('compress', [True, False])
def test_uniter_lmdb_keeps_first_nbb_boxes_and_scales_to_pixels(tmp_path, compress):
  images = fx.random_images(4, IDS)
  image_dir = fx.write_uniter_dir(str(tmp_path / 'coco'), images, compress=compress)
  sizes = {formats.image_key(im['image_id'], 'number'): (im['image_h'], im['image_w'])
           for im in images}
  reader = formats.UniterLmdbReader(os.path.join(image_dir, 'feat_th0.2_max100_min10'),
                                    os.path.join(image_dir, 'nbb_th0.2_max100_min10.json'),
                                    fx.FEATURE_DIM, fx.NUM_CLASSES, sizes)
  by_id = {r.image_id: r for r in decode_all(reader)}
  for image in images:
    record = by_id[image['image_id']]
    assert record.num_boxes == len(image['boxes'])  # the 2 extra rows are dropped
    # fp16 storage of normalised boxes: pixel error below 64 px * 2^-11.
    np.testing.assert_allclose(record.boxes, image['boxes'], atol=0.05)
    np.testing.assert_allclose(record.features, image['features'], rtol=1e-3)
    np.testing.assert_allclose(record.class_probs, image['class_probs'], atol=1e-3)
    np.testing.assert_array_equal(
        record.object_ids, record.class_probs[:, 1:].astype(np.float32).argmax(-1))
    np.testing.assert_allclose(record.object_conf, image['objects_conf'], atol=1e-3)
    np.testing.assert_array_equal(record.attr_conf, 0)


def test_uniter_lmdb_without_sizes_keeps_normalised_boxes(tmp_path):
  images = fx.random_images(5, IDS[:1])
  image_dir = fx.write_uniter_dir(str(tmp_path / 'coco'), images)
  reader = formats.UniterLmdbReader(os.path.join(image_dir, 'feat_th0.2_max100_min10'),
                                    os.path.join(image_dir, 'nbb_th0.2_max100_min10.json'),
                                    fx.FEATURE_DIM, fx.NUM_CLASSES)
  record, = decode_all(reader)
  assert (record.image_h, record.image_w) == (1, 1)
  w, h = images[0]['image_w'], images[0]['image_h']
  np.testing.assert_allclose(record.boxes, images[0]['boxes'] / [w, h, w, h], atol=1e-3)


def test_uniter_lmdb_box_counts_must_match(tmp_path):
  images = fx.random_images(6, IDS)
  image_dir = fx.write_uniter_dir(str(tmp_path / 'coco'), images,
                                  box_counts={IDS[0]: 2, 'COCO_val2014_000000000077': 2})
  with pytest.raises(ValueError, match=r'2 LMDB keys have no box count.*1 counted images'):
    formats.UniterLmdbReader(os.path.join(image_dir, 'feat_th0.2_max100_min10'),
                             os.path.join(image_dir, 'nbb_th0.2_max100_min10.json'),
                             fx.FEATURE_DIM, fx.NUM_CLASSES)


def test_uniter_lmdb_too_few_rows_and_bad_value(tmp_path):
  images = fx.random_images(7, IDS[:2])
  values = {IDS[0]: fx.uniter_value(images[0]), IDS[1]: b'not an archive'}
  image_dir = fx.write_uniter_dir(str(tmp_path / 'coco'), images, values=values,
                                  box_counts={IDS[0]: 50, IDS[1]: 2})
  reader = formats.UniterLmdbReader(os.path.join(image_dir, 'feat_th0.2_max100_min10'),
                                    os.path.join(image_dir, 'nbb_th0.2_max100_min10.json'),
                                    fx.FEATURE_DIM, fx.NUM_CLASSES)
  report = formats.ErrorReport('skip', 'test')
  assert formats.scan([reader], report) == []
  reasons = {s['where'].rsplit('[', 1)[1]: s['reason'] for s in report.skipped}
  assert reasons[IDS[0] + ']'].startswith('norm_bb: expected shape [>= 50')
  assert 'neither an .npz archive nor msgpack' in reasons[IDS[1] + ']']


def test_npz_folder(tmp_path):
  images = fx.random_images(8, IDS)
  folder = fx.write_npz_folder(str(tmp_path / 'npz'), images, with_class_probs=True)
  reader = formats.NpyFolderReader(folder, fx.FEATURE_DIM, fx.NUM_CLASSES)
  for record, image in zip(decode_all(reader), images):
    assert_matches(record, image)
    np.testing.assert_allclose(record.class_probs, image['class_probs'], atol=1e-3)
  # Asking for class probabilities the files do not have is an error, not zeros.
  plain = fx.write_npz_folder(str(tmp_path / 'plain'), images)
  with pytest.raises(formats.FormatError, match='class_probs: missing'):
    decode_all(formats.NpyFolderReader(plain, fx.FEATURE_DIM, fx.NUM_CLASSES))


def test_pythia_folder_needs_trust_pickle(tmp_path):
  images = fx.random_images(9, IDS[:2])
  folder = fx.write_pythia_folder(str(tmp_path / 'pythia'), images)
  with pytest.raises(formats.PickleRefusedError, match='runs whatever code'):
    decode_all(formats.NpyFolderReader(folder, fx.FEATURE_DIM))
  records = decode_all(formats.NpyFolderReader(folder, fx.FEATURE_DIM, trust_pickle=True))
  for record, image in zip(records, images):
    assert_matches(record, image, check_objects=False)
    np.testing.assert_array_equal(record.object_ids, image['objects_id'])


def test_vilbert_lmdb_needs_trust_pickle(tmp_path):
  images = fx.random_images(10, IDS)
  path = fx.write_vilbert_lmdb(str(tmp_path / 'vilbert.lmdb'), images)
  with pytest.raises(formats.PickleRefusedError, match='trust_pickle=True'):
    formats.VilbertLmdbReader(path, fx.FEATURE_DIM)
  reader = formats.VilbertLmdbReader(path, fx.FEATURE_DIM, trust_pickle=True)
  by_id = {r.image_id: r for r in decode_all(reader)}  # the 'keys' entry is not an image
  assert sorted(by_id) == sorted(IDS)
  for image in images:
    assert_matches(by_id[image['image_id']], image, check_objects=False)


def test_make_record_checks():
  image = fx.random_image(np.random.default_rng(11), 'x')
  kwargs = dict(image_id='x', image_h=48, image_w=64, boxes=image['boxes'],
                features=image['features'], feature_dim=fx.FEATURE_DIM, num_classes=None)
  formats.make_record('here', **kwargs)
  bad = {  # name: (changed arguments, expected message)
      'image_h': (dict(image_h=0), 'image_h: expected a positive integer'),
      'dim': (dict(feature_dim=8), 'features: expected shape'),
      'inverted': (dict(boxes=image['boxes'][:, [2, 1, 0, 3]]), 'x2 < x1'),
      'overflow': (dict(features=image['features'] * 1e5), 'overflow float16'),
      'empty': (dict(boxes=np.zeros([0, 4]), features=np.zeros([0, fx.FEATURE_DIM])),
                'no regions'),
      'ids': (dict(object_ids=np.array([-1, 0, 0])), 'object_ids: ids out of range'),
  }
  for change, message in bad.values():
    with pytest.raises(formats.FormatError, match=message):
      formats.make_record('here', **{**kwargs, **change})


def test_image_key():
  assert formats.image_key('COCO_val2014_000000391895', 'number') == 391895
  assert formats.image_key('coco_val2014_000000391895.jpg', 'number') == 391895
  assert formats.image_key(391895, 'number') == 391895
  assert formats.image_key(391895, 'exact') == '391895'
  with pytest.raises(ValueError, match='does not end in a number'):
    formats.image_key('abc', 'number')


@pytest.mark.parametrize('raw, normalised', [
    ('Yes', 'yes'),
    ('two', '2'),
    ('a dog.', 'dog'),
    ('the man\'s hat', "man's hat"),
    ('dont know', "don't know"),
    ('1,000', '1000'),
    ('3.5', '3.5'),
    ('red/white', 'red white'),
    ('left, right', 'left right'),
    ('it is, really', 'it is really'),
    ('black and white!', 'black and white'),
    ('its', 'its'),
])
def test_normalize_answer(raw, normalised):
  assert ab.normalize_answer(raw) == normalised


def test_answer_scores_and_vocab():
  np.testing.assert_allclose([ab.answer_score(c) for c in range(6)], [0, 0.3, 0.6, 0.9, 1, 1])
  annotations = [dict(multiple_choice_answer=a) for a in
                 ['yes'] * 3 + ['Two', '2', '2'] + ['no'] * 2 + ['cat']]
  assert ab.build_answer_vocab(annotations, 3) == ['2', 'yes']
  assert ab.build_answer_vocab(annotations, 2) == ['2', 'yes', 'no']
  labels, scores = ab.soft_targets(['two', '2', 'yes', 'cat', '2', '2', 'Two', 'yes', 'no', 'x'],
                                   {'2': 0, 'yes': 1, 'no': 2})
  assert labels == [0, 1, 2]
  np.testing.assert_allclose(scores, [1.0, 0.6, 0.3])


COCO_IDS = ['9', '25', '42']


@pytest.mark.parametrize('index,adaptive', [('pkl', False), ('json', True), ('dataset', False)])
def test_butd_hdf5_rows_by_index_and_sizes_from_spatial_features(tmp_path, index, adaptive):
  # The fixed layout holds the same number of boxes per image, the adaptive one any.
  images = [fx.random_image(np.random.default_rng(i), image_id, num_boxes=2 + i if adaptive else 3,
                            image_h=48 + i, image_w=64 - i)
            for i, image_id in enumerate(COCO_IDS)]
  path = fx.write_butd_hdf5(str(tmp_path / 'train36.hdf5'), images, index, adaptive)
  reader = formats.ButdHdf5Reader(path, fx.FEATURE_DIM)
  records = decode_all(reader)
  # Row order: the fixture writes the images reversed.
  assert [r.image_id for r in records] == COCO_IDS[::-1]
  for record, image in zip(records, images[::-1]):
    assert_matches(record, image, check_objects=False)
    np.testing.assert_array_equal(record.object_conf, 0)
  assert reader.describe('25') == f'{path}[row 1] (image 25)'


def test_butd_hdf5_refuses_classes_in_its_index_pickle(tmp_path):
  import datetime  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  images = fx.random_images(0, COCO_IDS[:1])
  path = fx.write_butd_hdf5(str(tmp_path / 'val36.hdf5'), images)
  with open(tmp_path / 'val36_imgid2idx.pkl', 'wb') as f:
    pickle.dump({9: 0, 10: datetime.date(2020, 1, 1)}, f)
  with pytest.raises(formats.FormatError, match=r'val36_imgid2idx.pkl: the pickle asks for '
                     r'datetime.date'):
    formats.ButdHdf5Reader(path, fx.FEATURE_DIM)


def test_butd_hdf5_errors_name_the_row(tmp_path):
  images = [fx.random_image(np.random.default_rng(i), image_id, num_boxes=3)
            for i, image_id in enumerate(COCO_IDS[:2])]
  path = fx.write_butd_hdf5(str(tmp_path / 'a.hdf5'), images)
  with pytest.raises(FileNotFoundError, match='no image-id index'):
    os.remove(tmp_path / 'a_imgid2idx.pkl')
    formats.ButdHdf5Reader(path, fx.FEATURE_DIM)
  with open(tmp_path / 'a_imgid2idx.json', 'w') as f:
    json.dump({'9': 1, '25': 2}, f)
  with pytest.raises(formats.FormatError, match=r'a_imgid2idx.json \(image 25\): row 2 is not in '
                     r'\[0, 2\)'):
    formats.ButdHdf5Reader(path, fx.FEATURE_DIM)
  with open(tmp_path / 'a_imgid2idx.json', 'w') as f:
    json.dump({'9': 1}, f)
  # The row the index leaves out is not read; sizes can also be given.
  reader = formats.ButdHdf5Reader(path, fx.FEATURE_DIM, image_sizes={9: (480, 640)})
  record, = decode_all(reader)
  assert (record.image_id, record.image_h, record.image_w) == ('9', 480, 640)
  reader.file.close()
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, 'r+') as f:
    f['spatial_features'][1, 0, 2] *= 0.5  # image 9's first box now says the image is 2x wider
  with pytest.raises(formats.FormatError, match=r'a.hdf5\[row 1\] \(image 9\): spatial_features '
                     'disagree with image_bb on the image w'):
    decode_all(formats.ButdHdf5Reader(path, fx.FEATURE_DIM))
