"""The region detector (`vlpjax.detector`) against HF's modeling_frcnn.py, stage by stage.

The fixtures (tests/data/frcnn, see its README) hold a tiny random-weight
detector's state dict and what the port computed with it on two images;
arrays the port keeps NCHW are transposed to NHWC here.
"""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.checkpoints.state_dict import CheckpointMismatchError
from vlpjax.detector import model as detector_model
from vlpjax.detector import extractor
from vlpjax.detector import weights

DATA = pathlib.Path(__file__).parent / 'data' / 'frcnn'
WEIGHTS = DATA / 'frcnn_tiny_weights.npz'
# Dense outputs: max abs difference <= 1e-4, plus float32 rounding of large
# coordinates (decoded anchors reach ~700 px, where one ulp is 6e-5).
ATOL, RTOL = 1e-4, 2e-6


def load(name: str) -> dict[str, np.ndarray]:
  with np.load(DATA / name, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, -3, -1)


STAGES = load('frcnn_tiny_stages.npz')
PLAIN_STAGES = load('frcnn_tiny_plain_stages.npz')
FIXTURE_INFO = json.loads((DATA / 'frcnn_tiny.json').read_text())
HF_TINY = detector_model.DetectorConfig.tiny(selection='hf', nms_threshold=0.6)


def run_detector(config: detector_model.DetectorConfig, params, inputs=None):
  images, sizes, scales = inputs or (nhwc(STAGES['images']), STAGES['image_sizes'],
                                     STAGES['scales_yx'])
  apply = jax.jit(lambda p, i, s, c: detector_model.FasterRCNN(config).apply(
      {'params': p}, i, s, c, return_stages=True))
  return jax.tree.map(np.asarray, apply(params, images, sizes, scales))


@pytest.fixture(scope='module')
def params():
  return weights.import_hf_frcnn(WEIGHTS, HF_TINY)


@pytest.fixture(scope='module')
def outputs(params):
  return run_detector(HF_TINY, params)


def assert_close(actual, expected, name):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  diff = np.abs(actual - expected).max()
  print(f'{name}: max abs diff {diff:.3g}')
  np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL, err_msg=name)


def test_fixture_config_is_the_tiny_config():
  assert FIXTURE_INFO['vlpjax_config'] == {
      k: list(v) if isinstance(v, tuple) else v
      for k, v in vars(HF_TINY).items()}


def test_preprocess_matches_the_port():
  images, sizes, scales = detector_model.preprocess(
      HF_TINY, [STAGES['raw_image_0'], STAGES['raw_image_1']])
  np.testing.assert_array_equal(sizes, STAGES['image_sizes'])
  np.testing.assert_allclose(scales, STAGES['scales_yx'], rtol=1e-6)
  assert_close(images, nhwc(STAGES['images']), 'images')


def test_anchors_match_the_port():
  assert_close(detector_model.grid_anchors(HF_TINY, 8, 8), STAGES['anchors'], 'anchors')


DENSE_STAGES = [
    # (ours, the fixture's, to our layout)
    ('res4', 'res4', nhwc),
    ('rpn_objectness', 'rpn_objectness', nhwc),
    ('rpn_deltas', 'rpn_deltas', lambda x: nhwc(x).reshape(x.shape[0], 8, 8, -1, 4)),
    ('proposals', 'proposals', None),
    ('proposal_scores', 'proposal_logits', None),
    ('roi_features', 'roi_features', None),
    ('class_logits', 'obj_logits', None),
    ('box_deltas', 'box_deltas', None),
    ('attribute_logits', 'attr_logits', None),
]


@pytest.mark.parametrize('ours,theirs,layout', DENSE_STAGES, ids=[s[0] for s in DENSE_STAGES])
def test_stage_matches_the_port(outputs, ours, theirs, layout):
  expected = STAGES[theirs] if layout is None else layout(STAGES[theirs])
  assert_close(outputs['stages'][ours], expected, ours)


def test_anchor_decoding_matches_the_port():
  # From the port's own deltas: end to end, its 2e-6 differences in the deltas
  # reach 5e-4 on anchors 180 px wide.
  deltas = nhwc(STAGES['rpn_deltas']).reshape(2, -1, 4)
  decoded = jax.jit(detector_model.decode_boxes, static_argnums=2)(
      deltas, STAGES['anchors'][None], HF_TINY.rpn_box_weights)
  assert_close(decoded, STAGES['rpn_decoded'], 'rpn_decoded')


def test_proposal_counts_and_roi_pooling_match_the_port(outputs):
  stages = outputs['stages']
  np.testing.assert_array_equal(stages['proposal_valid'].sum(1), STAGES['num_proposals'])
  recorded = STAGES['roi_pooled'].shape[1]
  assert_close(stages['roi_pooled'][:, :recorded], np.moveaxis(STAGES['roi_pooled'], 2, -1),
               'roi_pooled')


def test_hf_selection_matches_the_port(outputs):
  regions = outputs['regions']
  np.testing.assert_array_equal(regions['num_boxes'], STAGES['num_detections'])
  np.testing.assert_array_equal(regions['classes'], STAGES['det_classes'])
  np.testing.assert_array_equal(regions['attributes'], STAGES['det_attrs'])
  for ours, theirs in [('boxes', 'det_boxes'), ('scores', 'det_scores'),
                       ('attribute_scores', 'det_attr_scores'), ('features', 'det_features')]:
    assert_close(regions[ours], STAGES[theirs], ours)


def test_plain_res5_and_maxpool_switches_match_the_port(params):
  config = HF_TINY.replace(res5_dilation=1, caffe_maxpool=False)
  outputs = run_detector(config, params)
  assert_close(outputs['stages']['res4'], nhwc(PLAIN_STAGES['res4']), 'res4')
  for ours, theirs in [('proposals', 'proposals'), ('roi_features', 'roi_features'),
                       ('class_logits', 'obj_logits'), ('box_deltas', 'box_deltas')]:
    assert_close(outputs['stages'][ours], PLAIN_STAGES[theirs], ours)
  regions = outputs['regions']
  np.testing.assert_array_equal(regions['classes'], PLAIN_STAGES['det_classes'])
  assert_close(regions['boxes'], PLAIN_STAGES['det_boxes'], 'boxes')
  assert_close(regions['features'], PLAIN_STAGES['det_features'], 'features')


# ----------------------------------------------------------------------------------
# generate_tsv selection, against a plain numpy transcription of its rules.


def numpy_nms(boxes, scores, threshold, valid=None):
  """torchvision's nms in numpy: stable descending order, IoU > threshold suppresses."""
  boxes = np.asarray(boxes, np.float32)
  valid = np.ones(len(boxes), bool) if valid is None else valid
  order = [i for i in np.argsort(-np.asarray(scores), kind='stable') if valid[i]]
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  keep = []
  for i in order:
    suppressed = False
    for j in keep:
      w = max(np.float32(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
      h = max(np.float32(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
      inter = np.float32(w * h)
      if np.float32(inter / np.float32(area[i] + area[j] - inter)) > threshold:
        suppressed = True
        break
    if not suppressed:
      keep.append(i)
  return keep


def numpy_generate_tsv(boxes, valid, logits, attr_logits, config):
  """The rules of bottom-up-attention's generate_tsv.py (background last here)."""
  boxes, logits = boxes[valid], logits[valid]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  max_conf = np.zeros(len(boxes), np.float32)
  for c in range(config.num_classes):
    keep = np.array(numpy_nms(boxes, probs[:, c], config.nms_threshold), int)
    max_conf[keep] = np.maximum(max_conf[keep], probs[keep, c])
  keep_boxes = np.where(max_conf >= config.score_threshold)[0]
  num_above = len(keep_boxes)
  by_confidence = np.argsort(max_conf, kind='stable')[::-1]
  if len(keep_boxes) < config.min_boxes:
    keep_boxes = by_confidence[:config.min_boxes]
  elif len(keep_boxes) > config.max_boxes:
    keep_boxes = by_confidence[:config.max_boxes]
  attr = np.exp(attr_logits[valid] - attr_logits[valid].max(-1, keepdims=True))
  attr /= attr.sum(-1, keepdims=True)
  return dict(index=keep_boxes, num_above=num_above, classes=probs[keep_boxes, :-1].argmax(-1),
              scores=probs[keep_boxes, :-1].max(-1), confidence=max_conf[keep_boxes],
              attributes=attr[keep_boxes, :-1].argmax(-1))


@pytest.mark.parametrize('score_threshold,min_boxes,max_boxes,branch', [
    (0.2, 2, 10, 'over max'), (0.99, 5, 10, 'under min'), (0.2, 1, 50, 'in range')])
def test_generate_tsv_selection_matches_numpy(score_threshold, min_boxes, max_boxes, branch):
  config = HF_TINY.replace(selection='generate_tsv', nms_threshold=0.3,
                           score_threshold=score_threshold, min_boxes=min_boxes,
                           max_boxes=max_boxes)
  valid = np.arange(50)[None] < STAGES['num_proposals'][:, None]
  valid[1, 40:] = False  # a padded image: its empty slots must never be picked
  regions = jax.tree.map(np.asarray, jax.jit(
      lambda *a: detector_model.select_generate_tsv(config, *a))(
          STAGES['proposals'], valid, STAGES['obj_logits'], STAGES['attr_logits'],
          STAGES['roi_features'], STAGES['scales_yx']))
  for b in range(2):
    expected = numpy_generate_tsv(STAGES['proposals'][b], valid[b], STAGES['obj_logits'][b],
                                  STAGES['attr_logits'][b], config)
    count = len(expected['index'])
    assert regions['num_boxes'][b] == count
    assert regions['valid'][b].sum() == count
    scale = STAGES['scales_yx'][b]
    np.testing.assert_allclose(regions['boxes'][b, :count],
                               STAGES['proposals'][b, expected['index']] *
                               np.array([scale[1], scale[0]] * 2), rtol=1e-6)
    np.testing.assert_array_equal(regions['features'][b, :count],
                                  STAGES['roi_features'][b, expected['index']])
    np.testing.assert_array_equal(regions['classes'][b, :count], expected['classes'])
    np.testing.assert_array_equal(regions['attributes'][b, :count], expected['attributes'])
    np.testing.assert_allclose(regions['confidence'][b, :count], expected['confidence'],
                               atol=1e-6)
    assert not regions['boxes'][b, count:].any()
    above = expected['num_above']
    assert {'over max': above > max_boxes, 'under min': above < min_boxes,
            'in range': min_boxes <= above <= max_boxes}[branch], (branch, above)


def test_generate_tsv_detector_jits_with_static_shapes(params):
  config = HF_TINY.replace(selection='generate_tsv', nms_threshold=0.3, min_boxes=10,
                           max_boxes=36)
  regions = run_detector(config, params)['regions']
  assert regions['boxes'].shape == (2, 36, 4)
  assert regions['features'].shape == (2, 36, config.res5_channels)
  assert regions['class_probs'].shape == (2, 36, config.num_classes + 1)
  np.testing.assert_array_equal(regions['num_boxes'], regions['valid'].sum(1))
  assert (regions['num_boxes'] >= 10).all() and (regions['num_boxes'] <= 36).all()


# ----------------------------------------------------------------------------------
# NMS and RoI pooling on hand-made inputs.


def test_nms_iou_boundary_is_strict():
  # IoU exactly 0.5: [0, 0, 4, 1] and [0, 0, 2, 1] share 2 of 4 units.
  boxes = jnp.array([[0, 0, 4, 1], [0, 0, 2, 1]], jnp.float32)
  scores = jnp.array([0.9, 0.8])
  valid = jnp.ones(2, bool)
  assert detector_model.nms_mask(boxes, scores, valid, 0.5).tolist() == [True, True]
  assert detector_model.nms_mask(boxes, scores, valid, 0.4999).tolist() == [True, False]
  assert numpy_nms(boxes, scores, 0.5) == [0, 1] and numpy_nms(boxes, scores, 0.4999) == [0]


@pytest.mark.parametrize('threshold', [0.3, 0.5, 0.7])
def test_nms_matches_numpy(threshold):
  rng = np.random.default_rng(1)
  corners = rng.uniform(0, 50, (60, 2)).astype(np.float32)
  boxes = np.concatenate([corners, corners + rng.uniform(1, 30, (60, 2))], 1).astype(np.float32)
  boxes[10] = boxes[3]  # identical boxes: IoU 1
  scores = rng.uniform(size=60).astype(np.float32)
  scores[20] = scores[21]  # a tie: the lower index ranks first
  boxes[21] = boxes[20]
  valid = np.ones(60, bool)
  valid[[5, 33]] = False
  expected = numpy_nms(boxes, scores, threshold, valid)
  mask = np.asarray(detector_model.nms_mask(jnp.asarray(boxes), jnp.asarray(scores),
                                            jnp.asarray(valid), threshold))
  assert sorted(np.flatnonzero(mask)) == sorted(expected)
  index, kept = detector_model.nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid),
                                   threshold, 8)
  assert np.asarray(index)[np.asarray(kept)].tolist() == expected[:8]
  assert np.asarray(kept).sum() == min(8, len(expected))


def numpy_roi_pool(features, box, scale, size):
  """torchvision's RoIPool CPU kernel, loop by loop (C round: halves away from zero)."""
  height, width, channels = features.shape
  c_round = lambda v: int(np.floor(abs(v) + 0.5) * np.sign(v))
  x1, y1, x2, y2 = (c_round(np.float32(v) * np.float32(scale)) for v in box)
  roi_w, roi_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
  bin_h, bin_w = np.float32(roi_h) / np.float32(size), np.float32(roi_w) / np.float32(size)
  out = np.zeros((size, size, channels), np.float32)
  for ph in range(size):
    for pw in range(size):
      hs = min(max(int(np.floor(np.float32(ph) * bin_h)) + y1, 0), height)
      he = min(max(int(np.ceil(np.float32(ph + 1) * bin_h)) + y1, 0), height)
      ws = min(max(int(np.floor(np.float32(pw) * bin_w)) + x1, 0), width)
      we = min(max(int(np.ceil(np.float32(pw + 1) * bin_w)) + x1, 0), width)
      if he > hs and we > ws:
        out[ph, pw] = features[hs:he, ws:we].max(axis=(0, 1))
  return out


def test_roi_pool_matches_numpy_kernel():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(9, 11, 3)).astype(np.float32)
  boxes = np.array([[8, 8, 24, 40],  # corners at exactly half a cell: round up
                    [0, 0, 176, 144],  # the whole map
                    [40, 24, 41, 25],  # under one cell
                    [100.4, 10.2, 170.9, 143.9]], np.float32)
  boxes = np.concatenate([boxes, np.sort(rng.uniform(0, 140, (12, 4)).astype(np.float32)
                                         .reshape(12, 2, 2), axis=1).transpose(0, 2, 1)
                          .reshape(12, 4)])
  pooled = np.asarray(detector_model.roi_pool(jnp.asarray(features), jnp.asarray(boxes),
                                              1 / 16, 7))
  for index, box in enumerate(boxes):
    np.testing.assert_array_equal(pooled[index], numpy_roi_pool(features, box, 1 / 16, 7),
                                  err_msg=f'box {box}')


# ----------------------------------------------------------------------------------
# Strict weight import.


def state_dict():
  return load('frcnn_tiny_weights.npz')


@pytest.mark.parametrize('change,named', [
    (lambda s: s.pop('backbone.res4.7.conv2.weight'), 'backbone.res4.7.conv2.weight'),
    (lambda s: s.update({'roi_heads.box_predictor.extra.weight': np.zeros(3)}),
     'roi_heads.box_predictor.extra.weight'),
    (lambda s: s.update({'backbone.res3.0.conv2.weight':
                         s['backbone.res3.0.conv2.weight'][:, :, :1, :1]}),
     'backbone.res3.0.conv2.weight'),
    # Equal size, other layout: a transposed conv weight is still an error.
    (lambda s: s.update({'backbone.res2.0.conv1.weight':  # [4, 8, 1, 1] in the fixture
                         s['backbone.res2.0.conv1.weight'].reshape(8, 4, 1, 1)}),
     'backbone.res2.0.conv1.weight'),
    (lambda s: s.update({'roi_heads.box_predictor.cls_score.weight':
                         s['roi_heads.box_predictor.cls_score.weight'][:-1]}),
     'roi_heads.box_predictor.cls_score.weight'),
    (lambda s: s.update({weights.CELL_ANCHORS_KEY: 2 * s[weights.CELL_ANCHORS_KEY]}),
     weights.CELL_ANCHORS_KEY),
    (lambda s: s.pop(weights.CELL_ANCHORS_KEY), weights.CELL_ANCHORS_KEY),
], ids=['missing', 'unexpected', 'misshapen_conv', 'transposed_conv', 'misshapen_linear',
        'other_anchors', 'no_anchors'])
def test_import_is_strict(change, named):
  broken = state_dict()
  change(broken)
  with pytest.raises(CheckpointMismatchError, match=named.replace('.', r'\.')):
    weights.import_hf_frcnn(broken, HF_TINY)


def test_import_reads_a_torch_bin(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'pytorch_model.bin'
  torch.save({k: torch.from_numpy(v) for k, v in state_dict().items()}, path)
  imported = weights.import_hf_frcnn(path, HF_TINY)
  expected = weights.import_hf_frcnn(WEIGHTS, HF_TINY)
  jax.tree.map(np.testing.assert_array_equal, imported, expected)
  kernel = imported['backbone']['res4_0']['conv2']['kernel']
  np.testing.assert_array_equal(
      kernel, state_dict()['backbone.res4.0.conv2.weight'].transpose(2, 3, 1, 0))


def write_pickle(path, value, protocol=2):
  with open(path, 'wb') as f:
    pickle.dump(value, f, protocol=protocol)
  return path


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_import_reads_a_detectron2_pkl(tmp_path, protocol):
  """detectron2's model-zoo layout, without the anchor buffer (optional there)."""
  model = {k: v for k, v in state_dict().items() if k != weights.CELL_ANCHORS_KEY}
  path = write_pickle(tmp_path / 'faster_rcnn_from_caffe_attr.pkl',
                      {'model': model, '__author__': 'test', 'matching_heuristics': False},
                      protocol)
  imported = weights.import_detectron2(path, HF_TINY)
  jax.tree.map(np.testing.assert_array_equal, imported, weights.import_hf_frcnn(WEIGHTS, HF_TINY))
  model.pop('backbone.res4.7.conv2.weight')
  write_pickle(path, {'model': model, '__author__': 'test'})
  with pytest.raises(CheckpointMismatchError, match=r'backbone\.res4\.7\.conv2\.weight'):
    weights.import_detectron2(path, HF_TINY)


class RunsCode:
  """A pickle that would call os.system when loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_detectron2_pkl_runs_no_code(tmp_path):
  marker = tmp_path / 'ran'
  model = dict(state_dict(), extra=RunsCode(marker))
  path = write_pickle(tmp_path / 'evil.pkl', {'model': model, '__author__': 'x'})
  with pytest.raises(ValueError, match=r'evil\.pkl.*asks for (posix|os)\.system'):
    weights.import_detectron2(path, HF_TINY)
  assert not marker.exists()
  objects = write_pickle(tmp_path / 'objects.pkl',
                         {'model': {'a.weight': np.array([RunsCode(marker)], dtype=object)}})
  with pytest.raises(ValueError, match='asks for'):
    weights.import_detectron2(objects, HF_TINY)
  numbers_as_objects = write_pickle(tmp_path / 'object_dtype.pkl',
                                    {'model': {'a.weight': np.array([1, 2], dtype=object)}})
  with pytest.raises(ValueError, match='array of Python objects'):
    weights.import_detectron2(numbers_as_objects, HF_TINY)
  assert not marker.exists()


def test_caffe2_blob_names_are_refused(tmp_path):
  path = write_pickle(tmp_path / 'blobs.pkl', {'res2_0_branch2a_w': np.zeros((4, 8, 1, 1))})
  with pytest.raises(ValueError, match='Caffe2/Detectron1 blob names'):
    weights.import_detectron2(path, HF_TINY)


def test_convert_writes_detector_params(tmp_path):
  from vlpjax import checkpointing, convert  # pylint: disable=import-outside-toplevel
  model = {k: v for k, v in state_dict().items() if k != weights.CELL_ANCHORS_KEY}
  path = write_pickle(tmp_path / 'tiny.pkl', {'model': model, '__author__': 'test'})
  convert.import_detector('butd-detectron2', str(path), str(tmp_path / 'out'), HF_TINY)
  expected = weights.import_hf_frcnn(WEIGHTS, HF_TINY)
  restored = checkpointing.restore_params(str(tmp_path / 'out'),
                                          jax.tree.map(np.asarray, expected))
  jax.tree.map(np.testing.assert_array_equal, restored, expected)
  # The config is saved with the params, and what reads them builds it.
  assert weights.read_config(tmp_path / 'out') == HF_TINY
  assert extractor.RegionExtractor.from_orbax(str(tmp_path / 'out')).config == HF_TINY
  config_file = tmp_path / 'out' / weights.CONFIG_FILE
  config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), res6=True)))
  with pytest.raises(ValueError, match=r"detector_config\.json: unknown detector config "
                     r"fields \['res6'\]"):
    weights.read_config(tmp_path / 'out')
  config_file.unlink()
  assert weights.read_config(tmp_path / 'out') == detector_model.DetectorConfig()
  # The command line imports into the published config: the tiny file does not fit it.
  command = [sys.executable, '-m', 'vlpjax.convert', '--from=butd-detectron2',
             f'--src={path}', f'--out={tmp_path}/published']
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0 and 'does not fit the detector config' in result.stderr
  assert 'backbone.res2.0.conv1.weight: checkpoint shape (4, 8, 1, 1)' in result.stderr
  result = subprocess.run(command + ['--config=configs/uniter.py:tiny'], capture_output=True,
                          text=True, check=False, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                          cwd=pathlib.Path(__file__).parent.parent)
  assert result.returncode != 0 and 'give --src and --out only' in result.stderr


def test_export_is_the_checkpoint_import_reads(params):
  exported = weights.export_hf_frcnn(params, HF_TINY)
  original = {k: v for k, v in state_dict().items() if not k.endswith('num_batches_tracked')}
  assert exported.keys() == original.keys()
  for key, value in original.items():
    np.testing.assert_allclose(exported[key], value, atol=1e-6, err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, weights.import_hf_frcnn(exported, HF_TINY), params)


def test_every_key_of_the_checkpoint_has_a_rule():
  rules = weights.rules(weights.param_shapes(HF_TINY))
  keys = set(state_dict()) - {weights.CELL_ANCHORS_KEY}
  keys = {k for k in keys if not k.endswith('num_batches_tracked')}
  assert {r.torch_key for r in rules} == keys


# ----------------------------------------------------------------------------------
# Static shapes.


def test_detector_jits_once_for_any_image_sizes(params):
  traces = []

  def detect(p, images, sizes, scales):
    traces.append(1)
    return detector_model.FasterRCNN(HF_TINY).apply({'params': p}, images, sizes, scales)

  detect = jax.jit(detect)
  images = nhwc(STAGES['images'])
  first = detect(params, images, STAGES['image_sizes'], STAGES['scales_yx'])
  second = detect(params, images, np.array([[64, 100], [128, 128]], np.int32),
                  STAGES['scales_yx'])
  assert len(traces) == 1
  for regions in (first['regions'], second['regions']):
    assert regions['boxes'].shape == (2, HF_TINY.max_boxes, 4)
    assert regions['valid'].shape == (2, HF_TINY.max_boxes)
  # The second image's smaller size clips its proposals, so the boxes differ.
  assert not np.array_equal(np.asarray(first['regions']['boxes']),
                            np.asarray(second['regions']['boxes']))


def test_extractor_gives_the_ports_regions_of_one_image(params):
  """The fixture's port ran both raw images as one batch padded to 128 x 128: the
  extractor, padding an RGB image to that size, gives image 0's regions."""
  bgr = STAGES['raw_image_0']
  rgb = bgr[..., ::-1].astype(np.uint8)
  assert np.array_equal(rgb[..., ::-1], bgr)  # the fixture's pixels are whole numbers
  extract = extractor.RegionExtractor(params, HF_TINY, padded_size=(128, 128))
  regions = extract(rgb)
  count = int(STAGES['num_detections'][0])
  assert len(regions['boxes']) == count
  assert regions['image_size'] == (bgr.shape[1], bgr.shape[0])
  np.testing.assert_array_equal(regions['classes'], STAGES['det_classes'][0][:count])
  for ours, theirs in [('boxes', 'det_boxes'), ('scores', 'det_scores'),
                       ('features', 'det_features')]:
    assert_close(regions[ours], STAGES[theirs][0][:count], ours)
  # One program serves every size; unpadded, each resized shape has its own.
  extract(np.zeros((50, 70, 3), np.uint8))
  assert extract._detect._cache_size() == 1  # pylint: disable=protected-access
  unpadded = extractor.RegionExtractor(params, HF_TINY)
  assert unpadded(rgb)['image_size'] == regions['image_size']
  with pytest.raises(ValueError, match=r'RGB \[H, W, 3\], got shape \(4, 4\)'):
    extract(np.zeros((4, 4)))


def test_published_config_shapes():
  config = detector_model.DetectorConfig()
  shapes = weights.param_shapes(config)
  predictor = shapes['box_predictor']
  assert predictor['cls_score']['kernel'].shape == (2048, 1601)
  assert predictor['bbox_pred']['kernel'].shape == (2048, 1600 * 4)
  assert predictor['cls_embedding']['embedding'].shape == (1601, 256)
  assert predictor['fc_attr']['kernel'].shape == (2304, 512)
  assert predictor['attr_score']['kernel'].shape == (512, 401)
  assert shapes['rpn_head']['conv']['kernel'].shape == (3, 3, 1024, 512)
  assert shapes['rpn_head']['objectness_logits']['kernel'].shape == (1, 1, 512, 12)
  assert len([k for k in shapes['backbone'] if k.startswith('res4_')]) == 23
  out = jax.eval_shape(
      lambda p, i, s, c: detector_model.FasterRCNN(config).apply(
          {'params': p}, i, s, c, return_stages=True),
      shapes, jax.ShapeDtypeStruct((2, 600, 1000, 3), jnp.float32),
      jax.ShapeDtypeStruct((2, 2), jnp.int32), jax.ShapeDtypeStruct((2, 2), jnp.float32))
  assert out['stages']['res4'].shape == (2, 38, 63, 1024)
  assert out['stages']['proposals'].shape == (2, 300, 4)
  assert out['stages']['roi_pooled'].shape == (2, 300, 14, 14, 1024)
  assert out['regions']['features'].shape == (2, 100, 2048)
  assert out['regions']['class_probs'].shape == (2, 100, 1601)


@pytest.mark.slow
def test_published_config_runs_end_to_end():
  config = detector_model.DetectorConfig()
  raw = np.random.default_rng(3).integers(0, 256, (480, 800, 3)).astype(np.float32)
  images, sizes, scales = detector_model.preprocess(config, [raw])
  assert images.shape == (1, 600, 1000, 3)
  detector = detector_model.FasterRCNN(config)
  params = jax.jit(detector.init)(jax.random.key(0), images, sizes, scales)['params']
  # Random weights that keep activations of order 1 through 101 layers (as the
  # fixtures' do): pixels are of order 100, and each residual branch adds to the sum.
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  for path in flat:
    if path == 'backbone/stem/kernel':
      flat[path] = flat[path] / 100
    elif path.endswith('conv3/norm/scale'):
      flat[path] = jnp.full_like(flat[path], 0.2)
    elif path.startswith('rpn_head/anchor_deltas/'):
      flat[path] = flat[path] / 100
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  regions = jax.tree.map(np.asarray, jax.jit(detector.apply)(
      {'params': params}, images, sizes, scales)['regions'])
  assert regions['features'].shape == (1, 100, 2048)
  assert 10 <= regions['num_boxes'][0] <= 100
  assert np.isfinite(regions['features']).all() and np.isfinite(regions['boxes']).all()
  kept = regions['boxes'][0, :regions['num_boxes'][0]]
  assert (kept >= 0).all() and (kept[:, [0, 2]] <= 800 + 1e-3).all()
  assert (kept[:, [1, 3]] <= 480 + 1e-3).all()
