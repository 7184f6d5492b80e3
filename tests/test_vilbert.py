"""ViLBERT: parity with the original code (tests/data/reference/vilbert_tiny.*),
layer schedule, published parameter counts, original-checkpoint import/export.

Figures: `pytest -s tests/test_vilbert.py` prints every compared output's max abs
and relative (to the output's absmax) difference.
"""
import functools
import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from hf_reference import unpadded_logits
from configs import vilbert as vilbert_config
from vlpjax.checkpoints import original
from vlpjax.checkpoints import state_dict as sd
from vlpjax.models import get_model
from vlpjax.models import layers
from vlpjax.models import vilbert
from vlpjax.objectives import pretraining

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'reference')
ATOL, RTOL = 1e-5, 1e-4  # max abs diff, and max abs diff / absmax of the reference


@pytest.fixture(scope='module')
def fixture():
  with np.load(os.path.join(REFERENCE, 'vilbert_tiny.npz'), allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def checkpoint(fixture, tmp_path_factory):
  """The fixture weights (q_dense included) as an original-style `.bin` file."""
  path = tmp_path_factory.mktemp('vilbert') / 'pytorch_model.bin'
  torch.save({k[len('param/'):]: torch.from_numpy(v) for k, v in fixture.items()
              if k.startswith('param/')}, path)
  return path


@pytest.fixture(scope='module')
def params(checkpoint):
  """The fixture weights imported by the real import path."""
  config = vilbert_config.model_config('tiny')
  return original.import_vilbert(config, checkpoint, _init_shapes('tiny', True))


@functools.lru_cache(maxsize=None)
def _init_shapes(size, pretraining, v_num_layers=None):
  """Param shapes (unboxed `jax.ShapeDtypeStruct`s) of a config size."""
  config = vilbert_config.model_config(size)
  if v_num_layers is not None:
    config.v_num_layers = v_num_layers
  model = get_model(config, pretraining=pretraining)
  args = _inputs(config)
  if pretraining:
    args += (jnp.zeros((2, 1), jnp.int32),)
  return jax.eval_shape(lambda: flax.linen.meta.unbox(model.init(jax.random.key(0), *args))
                        )['params']


def _inputs(config, batch=2, text_len=5, regions=3):
  return (jnp.ones((batch, text_len), jnp.int32), jnp.ones((batch, text_len)),
          jax.random.normal(jax.random.key(0), (batch, regions, config.feature_dim)),
          jnp.zeros((batch, regions, 5)), jnp.array([[1] * (regions - 1) + [0], [1] * regions]))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_parameter_counts():
  backbone = _init_shapes('base', False)
  pretraining = _init_shapes('base', True)
  # The published counts, plus the word table's padding rows (and the MLM bias's).
  config = vilbert_config.model_config('base')
  padding = layers.padded_vocab_size(config.vocab_size) - config.vocab_size
  assert _count(backbone) == (  # the original's 246,726,656 less q_dense
      235_705_856 + padding * config.hidden_size)
  assert _count(pretraining) == 239_023_229 + padding * (config.hidden_size + 1)
  assert (jax.tree_util.tree_structure(pretraining['backbone']) ==
          jax.tree_util.tree_structure(backbone))


def test_layer_schedule():
  tiny = vilbert_config.model_config('tiny')
  order = json.load(open(os.path.join(REFERENCE, 'vilbert_tiny.json')))['layer_execution_order']
  names = {'text': 'layer', 'vision': 'v_layer', 'co': 'c_layer'}
  assert [f'{names[kind]}[{i}]' for kind, i in vilbert.layer_schedule(
      tiny.num_layers, tiny.v_num_layers, tiny.v_biattention_id, tiny.t_biattention_id)
         ] == order
  base = vilbert_config.model_config('base')
  schedule = vilbert.layer_schedule(base.num_layers, base.v_num_layers,
                                    base.v_biattention_id, base.t_biattention_id)
  expected = [('text', i) for i in range(6)] + [('co', 0)]
  for i in range(5):
    expected += [('text', 6 + i), ('vision', i), ('co', i + 1)]
  assert schedule == expected + [('vision', 5), ('text', 11)]
  with pytest.raises(ValueError, match='must pair up'):
    vilbert.layer_schedule(12, 6, [0, 1], [11])
  with pytest.raises(ValueError, match=r't_biattention_id must be ascending'):
    vilbert.layer_schedule(12, 6, [0, 1], [11, 10])


def _read_keys(name):
  shapes, tied = {}, {}
  with open(os.path.join(REFERENCE, name)) as f:
    for line in f:
      if line.startswith('#') or not line.strip():
        continue
      key, shape, _, *rest = line.rstrip('\n').split('\t')
      shapes[key] = tuple(int(d) for d in re.findall(r'\d+', shape))
      if rest:
        tied[key] = re.search(r'tied -> (\S+)\)', rest[0]).group(1)
  return shapes, tied


def test_rules_cover_the_published_checkpoint():
  """Every key of the real 6/6 checkpoint (less q_dense and the tied decoder)
  has a rule with the right shape and every param is filled."""
  config = vilbert_config.model_config('base')
  target = _init_shapes('base', True)
  shapes, tied = _read_keys('vilbert_keys.txt')
  assert tied == original.VILBERT_TIED
  q_dense = {k for k in shapes if re.fullmatch(original.VILBERT_SKIP[0], k)}
  assert len(q_dense) == 4 * 6
  rules = original.vilbert_rules(config, pretraining=True)
  assert sorted(r.torch_key for r in rules) == sorted(set(shapes) - set(tied) - q_dense)
  flat = flax.traverse_util.flatten_dict(target, sep='/')
  assert sorted(r.path for r in rules) == sorted(flat)
  for rule in rules:
    rows = (flat[rule.path].shape if rule.vocab_rows is None else
            (rule.vocab_rows,) + flat[rule.path].shape[1:])  # the padded vocabulary's
    assert np.prod(shapes[rule.torch_key]) == np.prod(rows), rule
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), target)
  exported = original.export_vilbert(config, zeros)
  assert {k: v.shape for k, v in exported.items()} == {
      k: v for k, v in shapes.items() if k not in q_dense}


def _compare(name, ours, reference, absmax):
  diff = float(np.abs(np.asarray(ours) - reference).max())
  rel = diff / absmax
  print(f'  {name:24s} max abs diff {diff:.3e}  rel {rel:.3e}')
  assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
  assert diff <= ATOL and rel <= RTOL, f'{name}: max abs diff {diff:.3e}, rel {rel:.3e}'


@pytest.mark.parametrize('case', ['full', 'padded'])
def test_parity_with_original(case, fixture, params):
  config = vilbert_config.model_config('tiny')
  model = get_model(config)
  get = lambda name: fixture[f'in_{case}_{name}']
  input_ids = get('input_ids')
  batch, text_len = input_ids.shape
  text_mask, image_mask = get('attention_mask'), get('image_attention_mask')
  all_positions = np.broadcast_to(np.arange(text_len, dtype=np.int32), (batch, text_len))
  outputs, state = jax.jit(lambda: model.apply(
      {'params': params}, input_ids, text_mask, get('image_feat'), get('image_loc'),
      image_mask, all_positions, get('token_type_ids'), capture_intermediates=True,
      mutable=['intermediates']))()
  captured = state['intermediates']['backbone']
  real_text, real_image = text_mask.astype(bool), image_mask.astype(bool)

  def check(key, ours, real=None):
    reference = fixture[f'out_{case}_{key}']
    absmax = float(np.abs(reference).max())
    if real is not None:
      ours, reference = np.asarray(ours)[real], reference[real]
    _compare(key, ours, reference, absmax)

  print(f'\nViLBERT parity ({case}):')
  check('txt_emb', captured['embeddings']['__call__'][0][0], real_text)
  check('img_emb', captured['region_embeddings']['__call__'][0], real_image)
  for i in range(config.num_layers):
    check(f'layer_t{i}', captured[f'text_layer_{i}']['__call__'][0][0], real_text)
  for i in range(config.v_num_layers):
    check(f'layer_v{i}', captured[f'vision_layer_{i}']['__call__'][0][0], real_image)
  for k in range(len(config.v_biattention_id)):
    (text, image), _ = captured[f'co_layer_{k}']['__call__'][0]
    check(f'layer_c{k}_t', text, real_text)
    check(f'layer_c{k}_v', image, real_image)
  check('sequence_output_t', outputs['text'], real_text)
  check('sequence_output_v', outputs['vision'], real_image)
  check('pooled_output_t', outputs['text_pooled'])
  check('pooled_output_v', outputs['image_pooled'])
  check('prediction_scores_t', unpadded_logits(outputs['mlm_logits'], config.vocab_size),
        real_text)
  check('prediction_scores_v', outputs['region_logits'], real_image)
  check('seq_relationship_score', outputs['alignment_logits'])

  # The saved losses pin down the label conventions (alignment 0 = aligned): the
  # fixture's labels, put where `make_inputs` puts them, through our own
  # `compute_losses`. The fixture's image labels and targets leave out the
  # [IMG] region 0, which is never masked: weight and distribution 0 there.
  labels, match_label = get('masked_lm_labels'), get('next_sentence_label')
  masked = labels != -1
  image_masked = np.pad(get('image_label') == 1, ((0, 0), (1, 0)))
  targets = dict(
      match_label=match_label, matched=match_label == 0, text_mask=text_mask,
      region_mask=image_mask, real=np.ones(len(match_label), np.float32),
      match_weights=np.ones(len(match_label), np.float32), mlm_targets=np.where(masked, labels, 0),
      mlm_weights=masked.astype(np.float32), region_picked=image_masked,
      region_weights=image_masked.astype(np.float32), raw_region_feats=get('image_feat'),
      class_probs=np.pad(get('image_target'), ((0, 0), (1, 0), (0, 0))))
  loss_config = ml_collections.ConfigDict(dict(
      model=config, pretrain=pretraining.default_pretrain_config('vilbert')))
  loss_config.pretrain.tasks = ('mlm', 'region_kl', 'alignment')
  total, losses = pretraining.compute_losses('vilbert', outputs, targets, pretraining.ALL,
                                             loss_config)
  names = dict(mlm='masked_lm_loss', alignment='next_sentence_loss',
               region_kl='masked_img_loss')
  assert sorted(losses) == sorted(names), losses
  np.testing.assert_allclose(total, sum(losses.values()), rtol=1e-6)
  for name, key in names.items():
    check(key, np.asarray(losses[name]).reshape(1))


def test_export_round_trip_is_exact(fixture, params):
  config = vilbert_config.model_config('tiny')
  exported = original.export_vilbert(config, params)
  reference = {k[len('param/'):]: v for k, v in fixture.items()
               if k.startswith('param/') and 'q_dense' not in k}
  assert sorted(exported) == sorted(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again = original.import_vilbert(config, exported, _init_shapes('tiny', True))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_bare_backbone_and_strict_errors(checkpoint):
  config = vilbert_config.model_config('tiny')
  state = sd.read_state_dict(checkpoint)
  full = original.import_vilbert(config, state, _init_shapes('tiny', True))
  bare = {k[len('bert.'):]: v for k, v in state.items() if k.startswith('bert.')}
  backbone = original.import_vilbert(config, bare, _init_shapes('tiny', False))
  jax.tree_util.tree_map(np.testing.assert_array_equal, backbone, full['backbone'])
  untied = dict(state, **{'cls.predictions.decoder.weight':
                          state['cls.predictions.decoder.weight'] * 2})
  with pytest.raises(sd.CheckpointMismatchError, match='decoder.weight should be tied'):
    original.import_vilbert(config, untied, _init_shapes('tiny', True))
  fewer_layers = config.copy_and_resolve_references()
  fewer_layers.v_num_layers = 1
  with pytest.raises(sd.CheckpointMismatchError, match=r'unexpected keys.*v_layer\.1'):
    original.import_vilbert(fewer_layers, state, _init_shapes('tiny', True, v_num_layers=1))


def test_dropout_and_attention_outputs(params):
  config = vilbert_config.model_config('tiny')
  model = get_model(config)
  args = _inputs(config) + (jnp.zeros((2, 1), jnp.int32),)
  batch, text_len = args[0].shape
  regions = args[2].shape[1]
  variables = {'params': params}
  apply = jax.jit(functools.partial(model.apply, return_attention=True),
                  static_argnames='deterministic')
  out = apply(variables, *args)
  attention = out['attention']
  text_to_vision = attention['text_to_vision/layer_0']
  assert text_to_vision.shape == (batch, config.bi_num_heads, text_len, regions)
  assert attention['vision_to_text/layer_0'].shape == (batch, config.bi_num_heads, regions,
                                                       text_len)
  np.testing.assert_allclose(text_to_vision[0, :, :, -1], 0.0)  # padded region
  assert attention['vision/layer_1'].shape == (batch, config.v_num_heads, regions, regions)
  # An 'rbg' key: dropout masks compile much faster than with threefry on CPU.
  train = apply(variables, *args, deterministic=False,
                rngs={'dropout': jax.random.key(2, impl='rbg')})
  assert np.abs(train['text'] - out['text']).max() > 1e-3
  assert out['pooled'].shape == (batch, config.bi_hidden_size)
  assert (np.asarray(out['text_pooled']) >= 0).all()  # ReLU pooler
