"""VisualBERT: parity with HF transformers, HF import/export, shapes and numerics.

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

from configs import visualbert as visualbert_config
from hf_reference import perturb_, unpadded_logits
from vlpjax.checkpoints import hf
from vlpjax.checkpoints import state_dict as sd
from vlpjax.models import get_model
from vlpjax.models import layers
from vlpjax.models import visualbert

TOL = 1e-4
B, T, R = 2, 7, 5
TEXT_LENGTHS, REGION_COUNTS = (7, 4), (5, 3)
MLM_POSITIONS = np.array([[1, 3, 6], [0, 2, 3]], np.int32)


def tiny_config():
  return visualbert_config.model_config('tiny')


def hf_config(cfg):
  return transformers.VisualBertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
      visual_embedding_dim=cfg.feature_dim)


def make_inputs(cfg, seed=0):
  """A full first example; the second has padded text and padded regions."""
  rng = np.random.default_rng(seed)
  text_mask = (np.arange(T)[None] < np.array(TEXT_LENGTHS)[:, None]).astype(np.int32)
  region_mask = (np.arange(R)[None] < np.array(REGION_COUNTS)[:, None]).astype(np.int32)
  return dict(
      input_ids=(rng.integers(5, cfg.vocab_size, (B, T)) * text_mask).astype(np.int32),
      text_mask=text_mask,
      region_feats=rng.normal(size=(B, R, cfg.feature_dim)).astype(np.float32),
      region_loc=rng.uniform(size=(B, R, 4)).astype(np.float32),  # ignored by VisualBERT
      region_mask=region_mask,
      token_type_ids=rng.integers(0, 2, (B, T)).astype(np.int32) * text_mask)


@pytest.fixture(scope='module')
def hf_pretraining():
  torch.manual_seed(0)
  return perturb_(transformers.VisualBertForPreTraining(hf_config(tiny_config())))


def hf_run(model, visual_token_type_ids=None):
  x = make_inputs(tiny_config())
  kwargs = dict(input_ids=torch.from_numpy(x['input_ids']).long(),
                attention_mask=torch.from_numpy(x['text_mask']).float(),
                token_type_ids=torch.from_numpy(x['token_type_ids']).long(),
                visual_embeds=torch.from_numpy(x['region_feats']),
                visual_attention_mask=torch.from_numpy(x['region_mask']).float(),
                visual_token_type_ids=visual_token_type_ids)
  with torch.no_grad():
    backbone = model.visual_bert(**kwargs)
    full = model(**kwargs)
  sequence = backbone.last_hidden_state.numpy()
  return dict(text=sequence[:, :T], vision=sequence[:, T:], pooled=backbone.pooler_output,
              mlm_logits=np.take_along_axis(full.prediction_logits.numpy(),
                                            MLM_POSITIONS[..., None], axis=1),
              sentence_image_logits=full.seq_relationship_logits)


@pytest.fixture(scope='module')
def hf_outputs(hf_pretraining):
  return hf_run(hf_pretraining)


@pytest.fixture(scope='module')
def hf_dir(hf_pretraining, tmp_path_factory):
  path = tmp_path_factory.mktemp('hf_visualbert')
  hf_pretraining.save_pretrained(path / 'pretraining')
  hf_pretraining.visual_bert.save_pretrained(path / 'backbone')
  return path


def shapes_of(cfg, pretraining):
  model = get_model(cfg, pretraining=pretraining)
  args = {k: jnp.asarray(v) for k, v in make_inputs(cfg).items()}
  if pretraining:
    args['mlm_positions'] = MLM_POSITIONS
  return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **args))['params'])


def run(cfg, params, pretraining=True, inputs=None, rngs=None, **kwargs):
  """Jitted apply (one compile per config) on `make_inputs` or `inputs`."""
  model = get_model(cfg, pretraining=pretraining)
  args = {k: jnp.asarray(v) for k, v in (inputs or make_inputs(cfg)).items()}
  if pretraining:
    args['mlm_positions'] = MLM_POSITIONS
  static = {k: v for k, v in kwargs.items() if isinstance(v, bool)}
  dynamic = {k: v for k, v in kwargs.items() if not isinstance(v, bool)}
  apply = jax.jit(lambda p, a, r: model.apply({'params': p}, **a, rngs=r, **static))
  return apply(params, {**args, **dynamic}, rngs)


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def max_diffs(ours, reference):
  """Max |diff| per output of `reference`; MLM logits over its vocabulary."""
  ours = dict(ours)
  if 'mlm_logits' in reference:
    ours['mlm_logits'] = unpadded_logits(ours['mlm_logits'], reference['mlm_logits'].shape[-1])
  return {k: float(np.abs(np.asarray(ours[k], np.float32) - np.asarray(reference[k])).max())
          for k in reference}


def report(title, diffs):
  print(f'\n{title}, fp32 max|diff|:', ', '.join(f'{k}={v:.2e}' for k, v in diffs.items()))


@pytest.fixture(scope='module')
def imported(hf_dir):
  cfg = tiny_config()
  return hf.import_hf(cfg, hf_dir / 'pretraining', shapes_of(cfg, True))


@pytest.fixture(scope='module')
def reference(imported):
  """fp32 outputs of the imported HF weights."""
  return run(tiny_config(), imported)


@pytest.mark.parametrize('size,expected', [('base', 111_450_624), ('base_vcr', 110_270_976)])
def test_base_parameter_counts(size, expected):
  # As HF VisualBertModel counts them (2048-d and 512-d region features), plus
  # the word table's padding rows.
  config = visualbert_config.model_config(size)
  padding = layers.padded_vocab_size(config.vocab_size) - config.vocab_size
  assert count(shapes_of(config, False)) == expected + padding * config.hidden_size


def test_every_param_has_logical_axes_and_backbone_nests():
  cfg = tiny_config()
  args = {k: jnp.asarray(v) for k, v in make_inputs(cfg).items()}
  boxed = jax.eval_shape(lambda: get_model(cfg, pretraining=False).init(
      jax.random.key(0), **args))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  full = shapes_of(cfg, True)
  assert jax.tree.structure(full['backbone']) == jax.tree.structure(nn.unbox(boxed))


def test_special_visual_initialize_copies_the_text_tables():
  ids = jnp.zeros((1, 3), jnp.int32)
  feats = jnp.ones((1, 2, 6))
  for copy in (True, False):
    embeddings = visualbert.VisualBertEmbeddings(20, 8, 16, 2, copy, 0.0)
    params = jax.jit(embeddings.init)(jax.random.key(0), ids, ids, feats,
                                      jnp.ones((1, 2), jnp.int32))
    params = nn.unbox(params)['params']
    same_positions = np.array_equal(params['region_position_embeddings'],
                                    params['position_embeddings']['embedding'])
    same_types = np.array_equal(params['region_token_type_embeddings'],
                                params['token_type_embeddings']['embedding'])
    assert same_positions == same_types == copy


def test_hf_parity_pretraining(reference, hf_outputs):
  diffs = max_diffs(reference, hf_outputs)
  report('VisualBERT vs HF VisualBertForPreTraining', diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_hf_parity_backbone_and_visual_token_types(hf_dir, hf_pretraining, imported):
  cfg = tiny_config()
  params = hf.import_hf(cfg, hf_dir / 'backbone', shapes_of(cfg, False))
  jax.tree.map(np.testing.assert_array_equal, imported['backbone'], params)
  # Region token type 0 (the original code's choice) through explicit ids.
  zeros = np.zeros((B, R), np.int32)
  expected = hf_run(hf_pretraining, visual_token_type_ids=torch.from_numpy(zeros).long())
  assert np.abs(expected['text'] - hf_run(hf_pretraining)['text']).max() > 1e-3
  out = run(cfg, params, pretraining=False, visual_token_type_ids=zeros)
  diffs = max_diffs(out, {k: expected[k] for k in ('text', 'vision', 'pooled')})
  report('VisualBERT vs HF VisualBertModel (visual token type 0)', diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_export_round_trip(imported, hf_pretraining, tmp_path):
  cfg = tiny_config()
  exported = hf.export_hf(cfg, imported)
  expected = {k: v.numpy() for k, v in hf_pretraining.state_dict().items()}
  assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in expected.items()}
  for key, value in expected.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  sd.write_state_dict(exported, tmp_path / 'exported.safetensors')
  again = hf.import_hf(cfg, tmp_path / 'exported.safetensors', shapes_of(cfg, True))
  jax.tree.map(np.testing.assert_array_equal, again, imported)


def test_tied_decoder_bias_must_match(imported, tmp_path):
  cfg = tiny_config()
  exported = hf.export_hf(cfg, imported)
  exported['cls.predictions.decoder.bias'] = exported['cls.predictions.decoder.bias'] + 1
  sd.write_state_dict(exported, tmp_path / 'untied.safetensors')
  with pytest.raises(sd.CheckpointMismatchError, match='decoder.bias should be tied'):
    hf.import_hf(cfg, tmp_path / 'untied.safetensors', shapes_of(cfg, True))


def test_bf16_compute_with_fp32_params_stays_close(imported, reference):
  cfg = tiny_config()
  cfg.dtype = 'bfloat16'
  out = run(cfg, imported)
  assert out['text'].dtype == jnp.bfloat16
  vocabulary = lambda x: unpadded_logits(x, cfg.vocab_size)
  out['mlm_logits'], reference = vocabulary(out['mlm_logits']), dict(
      reference, mlm_logits=vocabulary(reference['mlm_logits']))
  for key in ('text', 'vision', 'pooled', 'mlm_logits', 'sentence_image_logits'):
    scale = float(jnp.abs(reference[key]).max())
    error = float(jnp.abs(out[key].astype(jnp.float32) - reference[key]).max())
    print(f'\nbf16 compute vs fp32: {key} max|diff| = {error:.2e} (max|fp32| = {scale:.2f})')
    assert error <= 0.05 * scale, (key, error, scale)


def test_fused_and_explicit_attention_agree(imported):
  cfg = tiny_config()
  cfg.attention_impl = 'xla'
  fused = run(cfg, imported['backbone'], pretraining=False)
  explicit = run(cfg, imported['backbone'], pretraining=False, return_attention=True)
  for key in ('text', 'vision', 'pooled'):
    np.testing.assert_allclose(fused[key], explicit[key], atol=1e-5)
  probs = explicit['attention']['joint/layer_1']
  assert probs.shape == (B, cfg.num_heads, T + R, T + R)
  # Padded text and padded regions get no attention.
  np.testing.assert_allclose(probs[1, :, :, TEXT_LENGTHS[1]:T], 0.0)
  np.testing.assert_allclose(probs[1, :, :, T + REGION_COUNTS[1]:], 0.0)


def test_dropout_needs_an_rng_and_changes_outputs(imported, reference):
  cfg = tiny_config()
  with pytest.raises(flax.errors.InvalidRngError):
    run(cfg, imported['backbone'], pretraining=False, deterministic=False)
  # An 'rbg' key compiles far faster than threefry on CPU.
  rngs = {'dropout': jax.random.key(1, impl='rbg')}
  noisy = run(cfg, imported['backbone'], pretraining=False, deterministic=False, rngs=rngs)
  assert float(jnp.abs(noisy['text'] - reference['text']).max()) > 1e-3


def test_bad_feature_dim_names_the_field(imported):
  inputs = make_inputs(tiny_config())
  inputs['region_feats'] = inputs['region_feats'][..., :-1]
  with pytest.raises(ValueError, match='feature_dim'):
    run(tiny_config(), imported, inputs=inputs)
