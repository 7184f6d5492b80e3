"""`python -m vlpjax.extract`: image files -> region features -> an images table
that trains, and pixels -> regions -> a fine-tuned model's answer."""
import json
import os
import pathlib
import subprocess
import sys

from PIL import Image
import numpy as np
import pytest
import tensorflow_datasets as tfds

import vlpjax
from configs import uniter
from vlpjax import convert, extract, train
from vlpjax.data import annotations_builder, formats, tables, vlp_world, world
from vlpjax.detector import extractor, weights
from vlpjax.tasks import vqa

import real_format_fixtures as fx
import test_detector as detector_tests

REPO = pathlib.Path(__file__).parent.parent


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


def random_pixels(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, shape + (3,)).astype(np.uint8) for shape in shapes]


def test_a_batch_is_its_images_padded_to_their_bucket(tiny_extractor):
  images = random_pixels(1, (60, 80), (90, 50), (64, 64))
  config = tiny_extractor.config  # short side 96, long side <= 128
  assert [extractor.bucket_size(config, *i.shape[:2]) for i in images] == [(128, 128)] * 3
  assert extractor.bucket_size(config, 40, 200) == (64, 128)  # (26, 128) resized
  assert tiny_extractor.batch_multiple == 8  # the 8 CPU devices: 3 images + 5 fillers
  alone = extractor.RegionExtractor(tiny_extractor.params, config, padded_size=(128, 128))
  for image, regions in zip(images, tiny_extractor.batch(images)):
    expected = alone(image)
    assert regions['image_size'] == expected['image_size'] == image.shape[1::-1]
    assert regions.keys() == expected.keys()
    for key in ('classes', 'attributes'):
      np.testing.assert_array_equal(regions[key], expected[key])
    for key in ('boxes', 'features', 'scores', 'attribute_scores', 'class_probs'):
      np.testing.assert_allclose(regions[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key)


def test_batches_group_files_by_bucket(tmp_path, caplog):
  shapes = {'wide1': (40, 200), 'square1': (60, 80), 'wide2': (40, 190), 'square2': (64, 64),
            'square3': (90, 50)}
  for name, image in zip(shapes, random_pixels(2, *shapes.values())):
    Image.fromarray(image).save(tmp_path / f'{name}.png')
  (tmp_path / 'broken.png').write_bytes(b'not an image')
  files = extract.image_files(str(tmp_path))
  config = detector_tests.HF_TINY
  names = lambda batch: [extract.image_id(f) for f in batch]
  with caplog.at_level('INFO'):
    assert [(names(b), size) for b, size in extract.batches(files, config, 2)] == [
        (['wide1', 'wide2'], (64, 128)), (['square1', 'square2'], (128, 128)),
        (['square3'], (128, 128)), (['broken'], None)]
  assert 'read 6 of 6 image headers' in caplog.text and 'ETA' in caplog.text
  assert [names(b) for b, size in extract.batches(files, config, 1)] == [
      [extract.image_id(f)] for f in files]
  with pytest.raises(formats.FormatError, match=r'broken\.png: not a readable image'):
    extract.image_shape(str(tmp_path / 'broken.png'))
  assert extract.image_shape(str(tmp_path / 'wide1.png')) == (40, 200)


def world_vqa_files(root, scenes, world_config, coco_split):
  """VQA v2 question and annotation files of the world's questions about `scenes`
  (each scene the COCO image of id index + 1)."""
  questions = [(scene.index * 100 + k, scene.index + 1, q['question'], q['answers'])
               for scene in scenes for k, q in enumerate(world.questions(scene, world_config))]
  fx.write_vqa(str(root), coco_split, questions)
  return questions


def test_rendered_world_images_extract_train_and_answer(tmp_path):
  """The world's rendered pixels -> `python -m vlpjax.extract` (a tiny random
  detector, batched) -> an images table and a VQA table built on it -> a VQA
  fine-tuning run -> `vlpjax.load(run).answer` on regions extracted from pixels."""
  world_config = vlp_world.WORLD_SIZES['tiny']
  scenes = [world.make_scene(world_config, i) for i in range(12)]
  train_scenes, val_scenes = scenes[:8], scenes[8:]
  photos = tmp_path / 'photos'
  photos.mkdir()
  for scene in scenes:
    split = 'train2014' if scene in train_scenes else 'val2014'
    Image.fromarray(world.render(scene, world_config.seed)).save(
        photos / f'COCO_{split}_{scene.index + 1:012d}.png')
  (photos / 'COCO_val2014_000000000099.jpg').write_bytes(b'\xff\xd8 truncated')
  detector = tmp_path / 'detector'
  convert.import_detector('hf-frcnn', str(detector_tests.WEIGHTS), str(detector),
                          detector_tests.HF_TINY)
  data_dir = tmp_path / 'data'
  command = [sys.executable, '-m', 'vlpjax.extract', f'--images={photos}', '--name=world',
             f'--data_dir={data_dir}', f'--weights={detector}', '--batch_size=4',
             '--on_error=skip']
  result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ETA' in result.stderr and 'region_npy/world' in result.stderr
  report = json.loads((data_dir / 'extracted' / 'world' / extract.REPORT_FILE).read_text())
  assert (report['extracted'], report['skipped']) == (12, 1)
  assert report['skipped_images'][0]['where'].endswith('COCO_val2014_000000000099.jpg')

  world_vqa_files(tmp_path, train_scenes, world_config, 'train2014')
  val_questions = world_vqa_files(tmp_path, val_scenes, world_config, 'val2014')
  annotations_builder.main(['vqa_v2', '--config', 'world', '--images', 'region_npy/world',
                            '--data_dir', str(data_dir), '--manual_dir', str(tmp_path),
                            '--min_answer_count', '1'])
  words = sorted({w for scene in scenes for q in world.questions(scene, world_config)
                  for w in q['question'].lower().replace('?', ' ?').split()})
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words) + '\n')

  config = uniter.get_config('tiny,task=vqa')
  config.data.update(name='world_pixels', data_dir=str(data_dir), vocab_file=str(vocab),
                     lowercase=True, images_dataset='region_npy/world',
                     vqa_dataset='vqa_v2/world')
  info = tables.dataset_info(config.data)
  assert info['feature_dim'] == detector_tests.HF_TINY.res5_channels and info['num_images'] == 12
  config.model.update(vocab_size=info['vocab_size'], feature_dim=info['feature_dim'])
  config.train.update(global_batch_size=8, num_steps=2)
  config.evals = {'vqa_val': dict(config.evals.vqa_val, batch_size=8, log_steps=2,
                                  at_first_step=False)}
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(config, workdir)
  assert np.isfinite(final[vqa.resolve_loss(vqa.resolve_head('uniter'))])

  model = vlpjax.load(workdir)
  regions_of = extractor.RegionExtractor.from_orbax(str(detector))
  with open(os.path.join(workdir, 'predictions', 'vqa_val_step2.json'), encoding='utf-8') as f:
    evaluated = {p['question_id']: p['answer'] for p in json.load(f)}
  assert len(evaluated) == len(val_questions)
  scene = val_scenes[0]
  regions = regions_of.batch([world.render(scene, world_config.seed)])[0]
  asked = [q for q in val_questions if q[1] == scene.index + 1]
  answers = model.answer([q[2] for q in asked], regions['features'], regions['boxes'],
                         regions['image_size'])
  assert answers == [evaluated[q[0]] for q in asked]


def test_command_line_boxes_override_and_batch_size_check(tmp_path):
  """`--boxes=N` replaces the weights' saved box range (every image gets N
  regions); `--batch_size=0` is a usage error before anything is read."""
  detector = tmp_path / 'detector'
  convert.import_detector('hf-frcnn', str(detector_tests.WEIGHTS), str(detector),
                          detector_tests.HF_TINY)
  photos = tmp_path / 'photos'
  photos.mkdir()
  for index, pixels in enumerate(random_pixels(1, (48, 64), (64, 40))):
    Image.fromarray(pixels).save(photos / f'photo{index}.png')
  data_dir = tmp_path / 'data'
  command = [sys.executable, '-m', 'vlpjax.extract', f'--images={photos}', '--name=boxes',
             f'--data_dir={data_dir}', f'--weights={detector}']
  run = lambda *flags: subprocess.run(command + list(flags), capture_output=True, text=True,
                                      check=False, cwd=REPO,
                                      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  result = run('--batch_size=0')
  assert result.returncode != 0 and '--batch_size must be at least 1, got 0' in result.stderr
  assert not data_dir.exists()
  saved = weights.read_config(str(detector))
  boxes = saved.max_boxes + 2  # more than the saved range allows
  result = run(f'--boxes={boxes}')
  assert result.returncode == 0, result.stderr[-3000:]
  records = tfds.data_source('region_npy/boxes', split='train', data_dir=str(data_dir))
  assert [int(r['num_boxes']) for r in records] == [boxes, boxes]
