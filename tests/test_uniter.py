"""UNITER: parity with the original code (tests/data/reference/uniter_tiny.*),
published parameter counts, and the original-checkpoint import/export rules.

Figures: `pytest -s tests/test_uniter.py` prints every compared output's max abs
and relative (to the output's absmax) difference.
"""
import functools
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
from configs import uniter as uniter_config
from vlpjax.checkpoints import original
from vlpjax.checkpoints import state_dict as sd
from vlpjax.models import get_model
from vlpjax.models import layers
from vlpjax.models import uniter
from vlpjax.objectives import pretraining

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'reference')
ATOL, RTOL = 1e-5, 1e-4  # max abs diff, and max abs diff / absmax of the reference


@pytest.fixture(scope='module')
def fixture():
  with np.load(os.path.join(REFERENCE, 'uniter_tiny.npz'), allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def checkpoint(fixture, tmp_path_factory):
  """The fixture weights as an original-style `.pt` file of torch tensors."""
  path = tmp_path_factory.mktemp('uniter') / 'uniter_tiny.pt'
  torch.save({k[len('param/'):]: torch.from_numpy(v) for k, v in fixture.items()
              if k.startswith('param/')}, path)
  return path


def _inputs(config, batch=2, text_len=5, regions=3):
  return (jnp.ones((batch, text_len), jnp.int32), jnp.ones((batch, text_len)),
          jnp.zeros((batch, regions, config.feature_dim)), jnp.zeros((batch, regions, 7)),
          jnp.ones((batch, regions)))


@pytest.fixture(scope='module')
def params(checkpoint):
  """The fixture weights imported by the real import path."""
  config = uniter_config.model_config('tiny')
  return original.import_uniter(config, checkpoint, _init_shapes('tiny', True))


@functools.lru_cache(maxsize=None)
def _init_shapes(size, pretraining):
  """Param shapes (unboxed `jax.ShapeDtypeStruct`s) of a config size."""
  config = uniter_config.model_config(size)
  model = get_model(config, pretraining=pretraining)
  args = _inputs(config)
  if pretraining:
    args += (jnp.zeros((2, 1), jnp.int32),)
  return jax.eval_shape(lambda: flax.linen.meta.unbox(model.init(jax.random.key(0), *args))
                        )['params']


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('size,backbone,pretraining', [
    ('base', 109_898_752, 112_938_887), ('large', 335_695_872, 340_524_935)])
def test_parameter_counts(size, backbone, pretraining):
  backbone_params = _init_shapes(size, False)
  pretraining_params = _init_shapes(size, True)
  # The published counts, plus the word table's padding rows (and the MLM bias's).
  config = uniter_config.model_config(size)
  padding = layers.padded_vocab_size(config.vocab_size) - config.vocab_size
  assert _count(backbone_params) == backbone + padding * config.hidden_size
  assert _count(pretraining_params) == (  # tied weights counted once
      pretraining + padding * (config.hidden_size + 1))
  assert (jax.tree_util.tree_structure(pretraining_params['backbone']) ==
          jax.tree_util.tree_structure(backbone_params))


def _read_keys(name):
  """key -> shape for every line of a *_keys.txt, and the tied copies."""
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


@pytest.mark.parametrize('size,keys_file', [('base', 'uniter_keys.txt'),
                                            ('large', 'uniter_large_keys.txt')])
def test_rules_cover_the_published_checkpoint(size, keys_file):
  """Every key of the real UniterForPretraining checkpoint has a rule with the
  right shape, and every param is filled: so the real .pt files import."""
  config = uniter_config.model_config(size)
  target = _init_shapes(size, True)
  shapes, tied = _read_keys(keys_file)
  assert tied == original.UNITER_TIED
  rules = original.uniter_rules(config, pretraining=True)
  assert sorted(r.torch_key for r in rules) == sorted(set(shapes) - set(tied))
  flat = flax.traverse_util.flatten_dict(target, sep='/')
  assert sorted(r.path for r in rules) == sorted(flat)
  for rule in rules:
    rows = (flat[rule.path].shape if rule.vocab_rows is None else
            (rule.vocab_rows,) + flat[rule.path].shape[1:])  # the padded vocabulary's
    assert np.prod(shapes[rule.torch_key]) == np.prod(rows), rule
  # Shapes written back by export are those of the checkpoint.
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), target)
  exported = original.export_uniter(config, zeros)
  assert {k: v.shape for k, v in exported.items()} == shapes


def _compare(name, ours, reference, absmax):
  diff = float(np.abs(np.asarray(ours) - reference).max())
  rel = diff / absmax
  print(f'  {name:28s} max abs diff {diff:.3e}  rel {rel:.3e}')
  assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
  assert diff <= ATOL and rel <= RTOL, f'{name}: max abs diff {diff:.3e}, rel {rel:.3e}'


def _loss_config():
  """The run config `compute_losses` reads: UNITER's pretrain defaults with every
  task of the fixture, WRA off (the fixture has no OT loss)."""
  config = ml_collections.ConfigDict(dict(
      model=uniter_config.model_config('tiny'),
      pretrain=pretraining.default_pretrain_config('uniter')))
  config.pretrain.tasks = ('itm', 'mlm', 'mrfr', 'mrckl')
  config.pretrain.ratios = (1, 1, 1, 1)
  config.pretrain.loss_weights = {'wra': 0.0}
  return config


def _per_example(rows, batch):
  """[K, 2] (example, position) rows in row-major order -> `mlm_positions`
  [B, P] (padded with 0) and the index of each row in our [B, P] outputs."""
  per_example = [rows[rows[:, 0] == b, 1] for b in range(batch)]
  positions = np.zeros((batch, max(len(p) for p in per_example)), np.int32)
  for b, p in enumerate(per_example):
    positions[b, :len(p)] = p
  index = [(b, i) for b, p in enumerate(per_example) for i in range(len(p))]
  return positions, tuple(np.array(index).T)


@pytest.mark.parametrize('case', ['full', 'padded'])
def test_parity_with_original(case, fixture, params):
  config = uniter_config.model_config('tiny')
  model = get_model(config)
  get = lambda name: fixture[f'in_{case}_{name}']
  input_ids, img_feat = get('input_ids'), get('img_feat')
  batch, text_len = input_ids.shape
  text_mask = np.arange(text_len)[None] < get('txt_lens')[:, None]
  region_mask = np.arange(img_feat.shape[1])[None] < get('num_bbs')[:, None]
  mlm_positions, mlm_index = _per_example(get('mlm_positions'), batch)

  apply = jax.jit(lambda ids, feats, masked: model.apply(
      {'params': params}, ids, text_mask, feats, get('img_pos_feat'), region_mask,
      mlm_positions, masked_regions=masked, capture_intermediates=True,
      mutable=['intermediates']))
  # No region masked: adds 0 * mask_embedding[1], exactly as passing None (one compile).
  unmasked = np.zeros(img_feat.shape[:2], bool)
  plain, state = apply(input_ids, img_feat, unmasked)
  mlm, _ = apply(get('mlm_input_ids'), img_feat, unmasked)
  mrm, _ = apply(input_ids, get('mrm_img_feat'), get('img_masks'))

  gather_index, real = get('gather_index'), get('attn_masks').astype(bool)
  packed = lambda joint: np.take_along_axis(np.asarray(joint), gather_index[..., None], 1)[real]
  sequence = lambda out: packed(np.concatenate([out['text'], out['vision']], 1))

  def check(label, ours, key, select=lambda x: x):
    reference = fixture[f'out_{case}_{key}']
    _compare(label, ours, select(reference), float(np.abs(reference).max()))

  print(f'\nUNITER parity ({case}):')
  captured = state['intermediates']['backbone']
  check('embedding_output', packed(np.concatenate(
      [captured['embeddings']['__call__'][0][0], captured['region_embeddings']['__call__'][0]],
      axis=1)), 'embedding_output', lambda x: x[real])
  for i in range(config.num_layers):
    check(f'all_layers[{i}]', packed(captured[f'layer_{i}']['__call__'][0][0]), 'all_layers',
          lambda x, i=i: x[i][real])
  check('sequence_output', sequence(plain), 'sequence_output', lambda x: x[real])
  check('pooled_output', plain['pooled'], 'pooled_output')
  check('itm_logits', plain['itm_logits'], 'itm_logits')
  check('mlm_sequence_output', sequence(mlm), 'mlm_sequence_output', lambda x: x[real])
  mlm_logits = unpadded_logits(mlm['mlm_logits'], config.vocab_size)[mlm_index]
  check('mlm_logits', mlm_logits, 'mlm_logits')
  check('mrm_sequence_output', sequence(mrm), 'mrm_sequence_output', lambda x: x[real])
  mrm_index = tuple(get('mrm_positions').T)
  mrfr_pred = np.asarray(mrm['mrfr_pred'])[mrm_index]
  mrc_logits = np.asarray(mrm['mrc_logits'])[mrm_index]
  check('mrfr_pred', mrfr_pred, 'mrfr_pred')
  check('mrc_logits', mrc_logits, 'mrc_logits')

  # The saved losses pin down what the logits mean (label conventions, targets):
  # the fixture's targets, put where `make_inputs` puts them, through our own
  # `compute_losses`, against the original's per-element losses reduced as its
  # pretraining reduces them (`.mean()`).
  itm_targets = get('itm_targets')
  base = dict(match_label=itm_targets, matched=itm_targets == 1, text_mask=text_mask,
              region_mask=region_mask, real=np.ones(len(itm_targets), np.float32),
              match_weights=np.ones(len(itm_targets), np.float32))
  mlm_targets = np.zeros(mlm_positions.shape, np.int32)
  mlm_targets[mlm_index] = get('txt_labels')[tuple(get('mlm_positions').T)]
  mlm_weights = np.zeros(mlm_positions.shape, np.float32)
  mlm_weights[mlm_index] = 1.0
  picked = get('img_masks')
  class_probs = np.zeros(img_feat.shape[:2] + (config.num_region_classes,), np.float32)
  class_probs[mrm_index] = get('label_targets')
  region_targets = dict(region_picked=picked, region_weights=picked.astype(np.float32),
                        raw_region_feats=img_feat, class_probs=class_probs)
  loss_config = _loss_config()
  for task, outputs, targets, key in (
      ('itm', plain, {}, 'itm_loss'),
      ('mlm', mlm, dict(mlm_targets=mlm_targets, mlm_weights=mlm_weights), 'mlm_loss'),
      ('mrfr', mrm, region_targets, 'mrfr_loss'),
      ('mrckl', mrm, region_targets, 'mrc_kl_loss')):
    total, losses = pretraining.compute_losses('uniter', outputs, {**base, **targets}, task,
                                               loss_config)
    assert sorted(losses) == [task], losses
    np.testing.assert_allclose(total, losses[task], rtol=1e-6)
    reference = fixture[f'out_{case}_{key}'].mean()
    _compare(key, np.asarray(losses[task]), reference, abs(float(reference)))


def test_backbone_targets(params, checkpoint):
  """A bare UniterModel state dict (no `uniter.` prefix) and the pretraining
  checkpoint (heads left out) both load into MODEL as params['backbone']; the
  bare one cannot fill a pretraining target."""
  config = uniter_config.model_config('tiny')
  state = sd.read_state_dict(checkpoint)
  bare = {k[len('uniter.'):]: v for k, v in state.items() if k.startswith('uniter.')}
  for source in (bare, checkpoint):
    backbone = original.import_uniter(config, source, _init_shapes('tiny', False))
    jax.tree_util.tree_map(np.testing.assert_array_equal, backbone, params['backbone'])
  with pytest.raises(sd.CheckpointMismatchError, match='backbone-only state dict'):
    original.import_uniter(config, bare, _init_shapes('tiny', True))


def test_export_round_trip_is_exact(fixture, params):
  config = uniter_config.model_config('tiny')
  exported = original.export_uniter(config, params)
  reference = {k[len('param/'):]: v for k, v in fixture.items() if k.startswith('param/')}
  assert sorted(exported) == sorted(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  backbone = original.export_uniter(config, params['backbone'])
  assert sorted(backbone) == sorted(k[len('uniter.'):] for k in reference
                                    if k.startswith('uniter.'))


def test_import_errors_are_strict(checkpoint):
  config = uniter_config.model_config('tiny')
  state = sd.read_state_dict(checkpoint)
  target = _init_shapes('tiny', True)
  untied = dict(state, **{'feat_regress.weight': state['feat_regress.weight'] + 1.0})
  with pytest.raises(sd.CheckpointMismatchError,
                     match='feat_regress.weight should be tied to .*img_linear.weight'):
    original.import_uniter(config, untied, target)
  missing = {k: v for k, v in state.items() if k != 'itm_output.bias'}
  with pytest.raises(sd.CheckpointMismatchError, match=r'missing keys.*itm_output\.bias'):
    original.import_uniter(config, missing, target)
  with pytest.raises(sd.CheckpointMismatchError, match=r'unexpected keys.*nsp_head\.weight'):
    original.import_uniter(config, dict(state, **{'nsp_head.weight': np.zeros(2)}), target)
  wrong_shape = dict(state, **{'itm_output.weight': np.zeros((3, 64), np.float32)})
  with pytest.raises(sd.CheckpointMismatchError, match=r'itm_output\.weight.*\(3, 64\)'):
    original.import_uniter(config, wrong_shape, target)


def test_masked_regions_use_mask_row_one_only(params):
  """Row 0 of mask_embedding never contributes; row 1 goes to masked regions."""
  config = uniter_config.model_config('tiny')
  module = uniter.RegionEmbeddings(config.hidden_size)
  feats = jax.random.normal(jax.random.key(0), (1, 3, config.feature_dim))
  loc = jnp.zeros((1, 3, 7))
  type_embedding = jnp.zeros(config.hidden_size)
  embedding_params = dict(params['backbone']['region_embeddings'])
  table = embedding_params['mask_embedding']
  embedding_params['mask_embedding'] = table.copy()
  embedding_params['mask_embedding'][0] = 1.0  # must not matter
  variables = {'params': embedding_params}
  embed = jax.jit(lambda f, m: module.apply(variables, f, loc, type_embedding, m))
  out = embed(feats, jnp.array([[True, False, False]]))
  plain = embed(feats, jnp.zeros((1, 3), bool))
  shifted = embed(feats.at[0, 0].add(table[1]), jnp.zeros((1, 3), bool))
  np.testing.assert_array_equal(embed(feats, None), plain)
  np.testing.assert_allclose(out[0, 1:], plain[0, 1:], atol=0)
  np.testing.assert_allclose(out[0, 0], shifted[0, 0], atol=1e-6)
  assert np.abs(out[0, 0] - plain[0, 0]).max() > 1e-3


def test_region_loc_must_have_seven_coordinates():
  config = uniter_config.model_config('tiny')
  model = get_model(config, pretraining=False)
  args = list(_inputs(config))
  args[3] = jnp.zeros((2, 3, 4))
  with pytest.raises(ValueError, match=r'region_loc must be \[B, R, 7\]'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), *args))


def test_bert_text_paths_name_text_layers():
  config = uniter_config.model_config('tiny')
  params = _init_shapes('tiny', False)
  paths = uniter.bert_text_paths(config)
  for path in [paths['embeddings'], paths['pooler'], *paths['layers']]:
    assert path in params
  assert set(params['embeddings']) == {'word_embeddings', 'position_embeddings',
                                       'token_type_embeddings', 'norm'}
