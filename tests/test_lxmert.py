"""LXMERT: parity with HF transformers, HF import/export, shapes and numerics.

Run with `-s` to see the measured max abs differences against HF.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import lxmert as lxmert_config
from hf_reference import perturb_, unpadded_logits
from vlpjax.checkpoints import hf
from vlpjax.checkpoints import state_dict as sd
from vlpjax.models import get_model
from vlpjax.models import layers

TOL = 1e-4
B, T, R, P = 2, 7, 5, 3
TEXT_LENGTHS, REGION_COUNTS = (7, 4), (5, 3)


def tiny_config():
  return lxmert_config.model_config('tiny')


def hf_config(cfg):
  return transformers.LxmertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
      l_layers=cfg.num_language_layers, r_layers=cfg.num_relation_layers,
      x_layers=cfg.num_cross_layers, visual_feat_dim=cfg.feature_dim,
      visual_pos_dim=cfg.visual_pos_dim, num_qa_labels=cfg.num_answers,
      num_object_labels=cfg.num_object_labels, num_attr_labels=cfg.num_attr_labels)


def make_inputs(cfg, seed=0):
  """A full first example; the second has padded text and padded regions."""
  rng = np.random.default_rng(seed)
  text_mask = (np.arange(T)[None] < np.array(TEXT_LENGTHS)[:, None]).astype(np.int32)
  region_mask = (np.arange(R)[None] < np.array(REGION_COUNTS)[:, None]).astype(np.int32)
  input_ids = rng.integers(5, cfg.vocab_size, (B, T)) * text_mask
  corners = np.sort(rng.uniform(0, 1, (B, R, 2, 2)), axis=2)  # x1 <= x2, y1 <= y2
  return dict(
      input_ids=input_ids.astype(np.int32), text_mask=text_mask,
      region_feats=rng.normal(size=(B, R, cfg.feature_dim)).astype(np.float32),
      region_loc=corners.transpose(0, 1, 3, 2).reshape(B, R, 4).astype(np.float32),
      region_mask=region_mask,
      token_type_ids=rng.integers(0, 2, (B, T)).astype(np.int32) * text_mask)


MLM_POSITIONS = np.array([[1, 3, 6], [0, 2, 3]], np.int32)


@pytest.fixture(scope='module')
def hf_pretraining():
  torch.manual_seed(0)
  return perturb_(transformers.LxmertForPreTraining(hf_config(tiny_config())))


@pytest.fixture(scope='module')
def hf_outputs(hf_pretraining):
  x = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
       for k, v in make_inputs(tiny_config()).items()}
  kwargs = dict(input_ids=x['input_ids'], visual_feats=x['region_feats'],
                visual_pos=x['region_loc'], attention_mask=x['text_mask'].float(),
                visual_attention_mask=x['region_mask'].float(),
                token_type_ids=x['token_type_ids'])
  with torch.no_grad():
    backbone = hf_pretraining.lxmert(**kwargs)
    full = hf_pretraining(**kwargs)
    objects = hf_pretraining.obj_predict_head(backbone.vision_output)
  gather = np.take_along_axis(full.prediction_logits.numpy(), MLM_POSITIONS[..., None], axis=1)
  return dict(text=backbone.language_output, vision=backbone.vision_output,
              pooled=backbone.pooled_output, mlm_logits=gather,
              matched_logits=full.cross_relationship_score,
              obj_logits=objects['obj'], attr_logits=objects['attr'],
              feat_pred=objects['feat'], qa_logits=full.question_answering_score)


@pytest.fixture(scope='module')
def hf_dir(hf_pretraining, tmp_path_factory):
  path = tmp_path_factory.mktemp('hf_lxmert')
  hf_pretraining.save_pretrained(path / 'pretraining')
  hf_pretraining.lxmert.save_pretrained(path / 'backbone')
  return path


def shapes_of(cfg, pretraining):
  model = get_model(cfg, pretraining=pretraining)
  args = {k: jnp.asarray(v) for k, v in make_inputs(cfg).items()}
  if pretraining:
    args['mlm_positions'] = MLM_POSITIONS
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), **args))
  return nn.unbox(variables['params'])


def run(cfg, params, pretraining=True, inputs=None, rngs=None, **static):
  """Jitted apply (one compile per config) on `make_inputs` or `inputs`."""
  model = get_model(cfg, pretraining=pretraining)
  args = {k: jnp.asarray(v) for k, v in (inputs or make_inputs(cfg)).items()}
  if pretraining:
    args['mlm_positions'] = MLM_POSITIONS
  apply = jax.jit(lambda p, a, r: model.apply({'params': p}, **a, rngs=r, **static))
  return apply(params, args, rngs)


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def max_diffs(ours, reference):
  """Max |diff| per output of `reference`; MLM logits over its vocabulary."""
  ours = dict(ours)
  if 'mlm_logits' in reference:
    ours['mlm_logits'] = unpadded_logits(ours['mlm_logits'], reference['mlm_logits'].shape[-1])
  return {k: float(np.abs(np.asarray(ours[k], np.float32) - np.asarray(reference[k])).max())
          for k in reference}


@pytest.fixture(scope='module')
def imported(hf_dir):
  cfg = tiny_config()
  return hf.import_hf(cfg, hf_dir / 'pretraining', shapes_of(cfg, True))


@pytest.fixture(scope='module')
def reference(imported):
  """fp32 outputs of the imported HF weights."""
  return run(tiny_config(), imported)


def test_base_parameter_counts():
  config = lxmert_config.model_config('base')
  params = shapes_of(config, True)
  # HF's counts, plus the word table's padding rows (and the MLM bias's).
  padding = layers.padded_vocab_size(config.vocab_size) - config.vocab_size
  assert count(params['backbone']) == 207_936_768 + padding * config.hidden_size  # LxmertModel
  assert count(params) == (  # LxmertForPreTraining, tied weights once
      228_051_752 + padding * (config.hidden_size + 1))


def test_every_param_has_logical_axes_and_backbone_nests():
  cfg = tiny_config()
  model, pretraining = get_model(cfg, pretraining=False), get_model(cfg)
  args = {k: jnp.asarray(v) for k, v in make_inputs(cfg).items()}
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **args))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  full = jax.eval_shape(lambda: pretraining.init(
      jax.random.key(0), **args, mlm_positions=MLM_POSITIONS))['params']
  assert (jax.tree.structure(nn.unbox(full['backbone'])) ==
          jax.tree.structure(nn.unbox(boxed)))


def test_hf_parity_pretraining(reference, hf_outputs):
  diffs = max_diffs(reference, hf_outputs)
  print('\nLXMERT vs HF LxmertForPreTraining, fp32 max|diff|:',
        ', '.join(f'{k}={v:.2e}' for k, v in diffs.items()))
  assert max(diffs.values()) <= TOL, diffs


def test_hf_parity_backbone_checkpoint(hf_dir, hf_outputs, imported):
  cfg = tiny_config()
  params = hf.import_hf(cfg, hf_dir / 'backbone', shapes_of(cfg, False))
  out = run(cfg, params, pretraining=False)
  diffs = max_diffs(out, {k: hf_outputs[k] for k in ('text', 'vision', 'pooled')})
  print('\nLXMERT vs HF LxmertModel, fp32 max|diff|:',
        ', '.join(f'{k}={v:.2e}' for k, v in diffs.items()))
  assert max(diffs.values()) <= TOL, diffs
  # The backbone of a pretraining checkpoint loads the same weights (fine-tuning).
  from_pretraining = hf.import_hf(cfg, hf_dir / 'pretraining', shapes_of(cfg, False))
  jax.tree.map(np.testing.assert_array_equal, from_pretraining, params)
  jax.tree.map(np.testing.assert_array_equal, imported['backbone'], params)


def test_export_round_trip(imported, hf_pretraining, tmp_path):
  cfg = tiny_config()
  exported = hf.export_hf(cfg, imported)
  reference = {k: v.numpy() for k, v in hf_pretraining.state_dict().items()}
  assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference.items()}
  for key, value in reference.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again = hf.import_hf(cfg, write(exported, tmp_path, 'exported'), shapes_of(cfg, True))
  jax.tree.map(np.testing.assert_array_equal, again, imported)


def write(state_dict, directory, name):
  path = directory / f'{name}.safetensors'
  sd.write_state_dict(state_dict, path)
  return path


def test_import_errors(imported, hf_dir, tmp_path):
  cfg = tiny_config()
  exported = hf.export_hf(cfg, imported)
  untied = dict(exported)
  untied['cls.predictions.decoder.weight'] = untied['cls.predictions.decoder.weight'] + 1
  with pytest.raises(sd.CheckpointMismatchError, match='tied'):
    hf.import_hf(cfg, write(untied, tmp_path, 'untied'), shapes_of(cfg, True))
  missing = {k: v for k, v in exported.items() if 'x_layers.1.visn_inter' not in k}
  with pytest.raises(sd.CheckpointMismatchError, match=r'x_layers\.1\.visn_inter\.dense'):
    hf.import_hf(cfg, write(missing, tmp_path, 'missing'), shapes_of(cfg, True))
  with pytest.raises(sd.CheckpointMismatchError, match='backbone-only'):
    hf.import_hf(cfg, hf_dir / 'backbone', shapes_of(cfg, True))
  wider = tiny_config()
  wider.num_answers += 1
  with pytest.raises(sd.CheckpointMismatchError, match='answer_head.logit_fc.3.weight'):
    hf.import_hf(wider, hf_dir / 'pretraining', shapes_of(wider, True))


def test_bf16_compute_with_fp32_params_stays_close(imported, reference):
  cfg = tiny_config()
  cfg.dtype = 'bfloat16'
  out = run(cfg, imported)
  assert out['text'].dtype == jnp.bfloat16
  vocabulary = lambda x: unpadded_logits(x, cfg.vocab_size)
  out['mlm_logits'], reference = vocabulary(out['mlm_logits']), dict(
      reference, mlm_logits=vocabulary(reference['mlm_logits']))
  for key in ('text', 'vision', 'pooled', 'mlm_logits', 'qa_logits', 'feat_pred'):
    scale = float(jnp.abs(reference[key]).max())
    error = float(jnp.abs(out[key].astype(jnp.float32) - reference[key]).max())
    print(f'\nbf16 compute vs fp32: {key} max|diff| = {error:.2e} (max|fp32| = {scale:.2f})')
    assert error <= 0.05 * scale, (key, error, scale)


def test_fused_and_explicit_attention_agree(imported):
  cfg = tiny_config()
  cfg.attention_impl = 'xla'
  fused = run(cfg, imported['backbone'], pretraining=False)
  explicit = run(cfg, imported['backbone'], pretraining=False, return_attention=True)
  assert 'attention' not in fused
  for key in ('text', 'vision', 'pooled'):
    np.testing.assert_allclose(fused[key], explicit[key], atol=1e-5)
  attention = explicit['attention']
  assert attention['text/layer_0'].shape == (B, cfg.num_heads, T, T)
  assert attention['vision/layer_1'].shape == (B, cfg.num_heads, R, R)
  language_cross = attention['text_to_vision/layer_0']
  assert language_cross.shape == (B, cfg.num_heads, T, R)
  assert attention['vision_to_text/layer_1'].shape == (B, cfg.num_heads, R, T)
  # Padded regions get no attention from the text.
  np.testing.assert_allclose(language_cross[1, :, :, REGION_COUNTS[1]:], 0.0)


def test_remat_gives_the_same_outputs(imported, reference):
  cfg = tiny_config()
  cfg.remat = True
  out = run(cfg, imported)
  np.testing.assert_allclose(out['mlm_logits'], reference['mlm_logits'], atol=1e-5)


def test_dropout_needs_an_rng_and_changes_outputs(imported, reference):
  cfg = tiny_config()
  with pytest.raises(flax.errors.InvalidRngError):
    run(cfg, imported['backbone'], pretraining=False, deterministic=False)
  # An 'rbg' key compiles far faster than threefry on CPU.
  rngs = {'dropout': jax.random.key(1, impl='rbg')}
  noisy = run(cfg, imported['backbone'], pretraining=False, deterministic=False, rngs=rngs)
  assert float(jnp.abs(noisy['text'] - reference['text']).max()) > 1e-3


def test_bad_inputs_name_the_field(imported):
  cfg = tiny_config()
  inputs = make_inputs(cfg)
  inputs['region_feats'] = inputs['region_feats'][..., :-1]
  with pytest.raises(ValueError, match='feature_dim'):
    run(cfg, imported, inputs=inputs)
  inputs = make_inputs(cfg)
  inputs['region_loc'] = np.concatenate([inputs['region_loc']] * 2, axis=-1)
  with pytest.raises(ValueError, match='visual_pos_dim'):
    run(cfg, imported, inputs=inputs)
