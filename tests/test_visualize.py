"""Attention maps (`vlpjax.visualize`): the probabilities are the model's own,
read at the example's real positions through the backbone contract's schema, and
drawn for every design; the command draws a run's example."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from task_testing import image_inputs, rows_of_first_image
from test_finetune import tiny_config
from vlpjax import train, visualize
from vlpjax.data import tokenizer as tokenizer_lib
from vlpjax.data import vlp_world
from vlpjax.models import DESIGNS, get_model

pytestmark = pytest.mark.usefixtures('compile_cache')

TEXT = 'a red circle left of a blue square'


def model_and_example(design, data_dir):
  """(AttentionModel with random params of the pretraining model's backbone, the
  pretraining model, its params, the example's backbone inputs, (features,
  boxes, size) of the first validation image)."""
  config = tiny_config(design, data_dir)
  tokenizer = tokenizer_lib.BertTokenizer(vlp_world.vocab_path(data_dir, 'tiny'),
                                          config.data.max_text_len)
  model = visualize.AttentionModel(config, tokenizer)
  _, image = rows_of_first_image(data_dir, 'tiny_captions')
  features, boxes, size = image_inputs(image)
  features = features[:5]  # fewer regions than the slots: padded keys exist
  boxes = boxes[:5]
  inputs = model.inputs(TEXT, features, boxes, size)
  pretraining = get_model(config.model)
  mlm_positions = np.zeros((1, 1), np.int32)
  params = pretraining.init(jax.random.key(0), **inputs, mlm_positions=mlm_positions)['params']
  model.params = params['backbone']
  return model, pretraining, params, inputs, (features, boxes, size)


@pytest.mark.parametrize('design', DESIGNS)
def test_maps_are_the_models_own_attention_at_real_positions(design, data_dir, tmp_path):
  model, pretraining, params, inputs, image = model_and_example(design, data_dir)
  result = model.attention(TEXT, *image)
  own = pretraining.apply({'params': params}, **inputs, mlm_positions=np.zeros((1, 1), np.int32),
                          deterministic=True, return_attention=True)['attention']
  assert set(result.probs) == set(own)
  text = np.asarray(inputs['text_mask'][0], bool)
  regions = np.asarray(inputs['region_mask'][0], bool)
  assert len(result.tokens) == text.sum() and result.tokens[0] == '[CLS]'
  assert result.tokens[-1] == '[SEP]' and len(result.boxes) == 5
  for key, p in result.probs.items():
    stream = key.split('/')[0]
    q, k = dict(joint=(np.r_[text, regions],) * 2, text=(text, text),
                vision=(regions, regions), text_to_vision=(text, regions),
                vision_to_text=(regions, text))[stream]
    full = np.asarray(own[key][0])
    np.testing.assert_allclose(p, full[:, q][:, :, k], atol=1e-6)  # jitted vs not
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)  # padded keys get nothing
    assert np.all(full[:, :, ~k] < 1e-6)

  word_to_region, region_to_word = result.word_to_region(), result.region_to_word()
  assert word_to_region and region_to_word
  t, first = len(result.tokens), result.leading_slots
  for key, w in word_to_region.items():
    assert w.shape[1:] == (t, 5)
    if key.startswith('joint'):
      np.testing.assert_array_equal(w, result.probs[key][:, :t, t + first:])
    else:
      np.testing.assert_array_equal(w, result.probs[key][:, :, first:])
  for key, w in region_to_word.items():
    assert w.shape[1:] == (5, t)

  image_pixels = visualize.example_image(model.config, 0, image[2])
  written = visualize.draw(result, image_pixels, str(tmp_path))
  assert len(written) == len(word_to_region) + len(region_to_word)
  for path in written:
    with Image.open(path) as png:
      assert png.format == 'PNG' and min(png.size) > 100
  stored = np.load(tmp_path / 'attention.npz')
  assert sorted(stored.files) == sorted(result.probs)


@pytest.mark.parametrize('design', ['uniter', 'visualbert'])
def test_joint_probabilities_are_softmax_of_the_layers_queries_and_keys(design, data_dir):
  """Recomputed from the first layer's own query and key projections: softmax(q.k /
  sqrt(d)) over the real keys."""
  model, _, _, inputs, image = model_and_example(design, data_dir)
  _, state = model.model.apply({'params': model.params}, **inputs, deterministic=True,
                               capture_intermediates=True, mutable=['intermediates'])
  attention = state['intermediates']['layer_0']['attention']
  # The projections' outputs, [T+R, N, D] of the one example.
  query, key = attention['query']['__call__'][0][0], attention['key']['__call__'][0][0]
  real = np.r_[np.asarray(inputs['text_mask'][0], bool), np.asarray(inputs['region_mask'][0], bool)]
  scores = jnp.einsum('qnd,knd->nqk', query[real], key[real]) / np.sqrt(query.shape[-1])
  expected = jax.nn.softmax(scores, axis=-1)
  result = model.attention(TEXT, *image)
  np.testing.assert_allclose(result.probs['joint/layer_0'], expected, atol=1e-5)


def test_word_to_region_mosaic_lights_the_attended_box():
  image = np.full((50, 100, 3), 255, np.uint8)
  boxes = np.array([[0, 0, 49, 49], [50, 0, 99, 49]], np.float32)
  weights = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)  # [rows 1, cols 2, R 2]
  mosaic = visualize.spotlight_mosaic(image, boxes, weights)
  cell_w = mosaic.shape[1] // 2
  first, second = mosaic[:, :cell_w], mosaic[:, cell_w:]
  half = cell_w // 2
  assert first[10:20, 5:half - 5].min() > 0.95 and first[10:20, half + 5:-5].max() < 0.25
  assert second[10:20, half + 5:-5].min() > 0.95 and second[10:20, 5:half - 5].max() < 0.25


def test_command_draws_an_example_of_a_run(data_dir, tmp_path):
  config = tiny_config('uniter', data_dir)
  config.train.num_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = tmp_path / 'maps'
  with pytest.raises(ValueError, match='--example=100000'):
    visualize.visualize_example(workdir, 100000, split='test')
  visualize.visualize_example(workdir, 1, split='test', output_dir=str(out))
  example = json.loads((out / 'example.json').read_text())
  assert example['step'] == 2 and example['tokens'][0] == '[CLS]'
  model = visualize.AttentionModel.from_workdir(workdir)
  pngs = sorted(p.name for p in out.glob('*.png'))
  layers = config.model.num_layers
  assert pngs == sorted([f'word_to_region_joint_layer{i}.png' for i in range(layers)]
                        + [f'region_to_word_joint_layer{i}.png' for i in range(layers)])
  stored = np.load(out / 'attention.npz')
  again = model.attention(example['text'], *_image_of(data_dir, example['image_index']))
  for key, p in again.probs.items():
    np.testing.assert_allclose(stored[key], p, atol=1e-6)
  default = visualize.visualize_example(workdir, 1, split='test', text='a blue square')
  assert default.endswith('attention/test_example1_step2')
  assert json.loads((tmp_path / 'run' / 'attention' / 'test_example1_step2' / 'example.json'
                     ).read_text())['text'] == 'a blue square'


def _image_of(data_dir, image_index):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  row = tfds.data_source('vlp_world/tiny_images', data_dir=data_dir)['train'][image_index]
  return image_inputs(row)


def test_images_of_other_tables_are_a_canvas_of_their_size(data_dir):
  config = tiny_config('uniter', data_dir)
  rendered = visualize.example_image(config, 0, (1, 1))
  assert rendered.dtype == np.uint8 and rendered.std() > 0  # the scene, not a canvas
  assert rendered.shape[2] == 3 and rendered.shape[:2] != (1, 1)
  config.data.name = 'coco'
  canvas = visualize.example_image(config, 0, (640.4, 479.6))
  assert canvas.shape == (480, 640, 3) and np.all(canvas == visualize.CANVAS_GREY)
