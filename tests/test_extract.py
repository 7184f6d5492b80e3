"""`python -m vlpjax.extract`: image files -> region features -> an images table."""
import json

from PIL import Image
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlpjax import extract
from vlpjax.data import formats
from vlpjax.detector import extractor, weights

import test_detector as detector_tests


@pytest.fixture(scope='module')
def tiny_extractor():
  params = weights.import_hf_frcnn(detector_tests.WEIGHTS, detector_tests.HF_TINY)
  return extractor.RegionExtractor(params, detector_tests.HF_TINY)


def write_images(folder):
  rng = np.random.default_rng(0)
  folder.mkdir()
  for name, shape in (('a', (60, 80)), ('b', (90, 50))):
    Image.fromarray(rng.integers(0, 256, shape + (3,)).astype(np.uint8)).save(folder / f'{name}.png')
  (folder / 'broken.jpg').write_bytes(b'not an image')
  (folder / 'notes.txt').write_text('not an image file, not read')
  return folder


def test_extract_builds_a_table_and_resumes(tmp_path, tiny_extractor):
  files = extract.image_files(str(write_images(tmp_path / 'photos')))
  assert [extract.image_id(f) for f in files] == ['a', 'b', 'broken']
  out = str(tmp_path / 'data' / 'extracted' / 'mine')
  # 'broken' comes last: the stopped run has written 'a' and 'b', which a rerun skips.
  with pytest.raises(formats.FormatError, match=r'broken\.jpg: not a readable image'):
    extract.extract_images(files, out, tiny_extractor)
  summary = extract.extract_images(files, out, tiny_extractor, on_error='skip')
  assert (summary['extracted'], summary['already_extracted'], summary['skipped']) == (0, 2, 1)
  assert summary['skipped_images'][0]['where'].endswith('broken.jpg')
  assert json.loads((tmp_path / 'data' / 'extracted' / 'mine' / extract.REPORT_FILE)
                    .read_text())['skipped'] == 1
  (tmp_path / 'data' / 'extracted' / 'mine' / 'b.npz').unlink()
  again = extract.extract_images(files, out, tiny_extractor, on_error='skip')
  assert (again['extracted'], again['already_extracted']) == (1, 1)

  table = extract.build_table('mine', out, str(tmp_path / 'data'), detector_tests.HF_TINY,
                              on_error='skip')
  rows = tfds.data_source(table, data_dir=str(tmp_path / 'data'))['train']
  assert len(rows) == 2
  pixels = np.asarray(Image.open(tmp_path / 'photos' / 'a.png'))
  expected = tiny_extractor(pixels)
  row = rows[0]
  assert row['image_id'].decode() == 'a'
  assert (row['image_w'], row['image_h']) == (80, 60)
  np.testing.assert_allclose(row['features'].astype(np.float32), expected['features'],
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(row['boxes'], expected['boxes'], atol=1e-3)
  np.testing.assert_array_equal(row['object_ids'], expected['classes'])
  np.testing.assert_array_equal(row['attr_ids'], expected['attributes'])
  # The background moves to column 0, as the data contract stores class distributions.
  np.testing.assert_allclose(row['class_probs'][:, 0], expected['class_probs'][:, -1], atol=1e-3)


def test_inputs_are_checked(tmp_path):
  with pytest.raises(FileNotFoundError, match='no image files'):
    extract.image_files(str(tmp_path))
  (tmp_path / 'same.png').write_bytes(b'')
  (tmp_path / 'same.jpg').write_bytes(b'')
  with pytest.raises(ValueError, match="same image id 'same'"):
    extract.image_files(str(tmp_path))
  assert extract.image_files(str(tmp_path / '*.png')) == [str(tmp_path / 'same.png')]
  assert extract.parse_boxes('36') == (36, 36) and extract.parse_boxes('10-100') == (10, 100)
  with pytest.raises(ValueError, match='MIN <= MAX'):
    extract.parse_boxes('50-10')
  with pytest.raises(ValueError, match='N or MIN-MAX'):
    extract.parse_boxes('many')
