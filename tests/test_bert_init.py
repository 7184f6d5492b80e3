"""BERT initialisation of the text side of every design (`hf.import_bert`).

A random HF `BertModel` saved with `save_pretrained` is loaded into each
design's tiny config; the loaded text embeddings and layers, run on padded text,
must reproduce BertModel's last hidden state, and nothing else may change.
"""
import functools
import importlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlpjax.checkpoints import hf
from vlpjax.checkpoints import state_dict as sd
from vlpjax.models import DESIGNS
from vlpjax.models import get_model
from vlpjax.models import layers

TOL = 1e-5
B, T, R = 2, 6, 3
TEXT_LENGTHS = (6, 3)
# Box dims of each design's region input (MODELS.md).
LOC_DIM = dict(visualbert=4, lxmert=4, uniter=7, vilbert=5)


def tiny_config(design):
  try:
    return importlib.import_module(f'configs.{design}').model_config('tiny')
  except ModuleNotFoundError:
    pytest.skip(f'configs/{design}.py is not written yet')


def flat(params):
  return flax.traverse_util.flatten_dict(params, sep='/')


def random_params(cfg, pretraining=False, seed=0):
  """Params of the right shapes filled with noise (cheaper than a real init)."""
  inputs = dict(input_ids=jnp.zeros((B, T), jnp.int32), text_mask=jnp.ones((B, T)),
                region_feats=jnp.zeros((B, R, cfg.feature_dim)),
                region_loc=jnp.zeros((B, R, LOC_DIM[cfg.name])), region_mask=jnp.ones((B, R)))
  if pretraining:
    inputs['mlm_positions'] = jnp.zeros((B, 1), jnp.int32)
  model = get_model(cfg, pretraining=pretraining)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def text_shapes(cfg, params):
  """BertConfig fields read off the design's text params (the vocabulary: the
  config's; the word table has padding rows past it)."""
  paths = importlib.import_module(f'vlpjax.models.{cfg.name}').bert_text_paths(cfg)
  p = flat(params)
  embeddings, layer = paths['embeddings'], paths['layers'][0]
  return paths, dict(
      vocab_size=cfg.vocab_size,
      hidden_size=p[f'{embeddings}/word_embeddings/embedding'].shape[1],
      max_position_embeddings=p[f'{embeddings}/position_embeddings/embedding'].shape[0],
      type_vocab_size=p[f'{embeddings}/token_type_embeddings/embedding'].shape[0],
      num_attention_heads=p[f'{layer}/attention/query/kernel'].shape[1],
      intermediate_size=p[f'{layer}/ffn/intermediate/kernel'].shape[1],
      num_hidden_layers=len(paths['layers']))


def save_random_bert(directory, seed=0, **config):
  torch.manual_seed(seed)
  bert = transformers.BertModel(transformers.BertConfig(**config))
  with torch.no_grad():  # no LayerNorm 1/0 or zero biases that could hide a bad mapping
    for param in bert.parameters():
      param.add_(0.1 * torch.randn_like(param))
  bert.eval().save_pretrained(directory)
  return bert


def text_inputs(vocab_size):
  rng = np.random.default_rng(1)
  mask = (np.arange(T)[None] < np.array(TEXT_LENGTHS)[:, None]).astype(np.int32)
  ids = (rng.integers(1, vocab_size, (B, T)) * mask).astype(np.int32)
  types = (rng.integers(0, 2, (B, T)) * mask).astype(np.int32)
  return ids, mask, types


def text_forward(params, ids, mask, types, *, paths, shapes):
  """The loaded embeddings and text layers (and pooler) on text alone."""
  def sub(path):
    return flax.traverse_util.unflatten_dict(
        {k[len(path) + 1:]: v for k, v in flat(params).items() if k.startswith(path + '/')},
        sep='/')
  embeddings = layers.TextEmbeddings(
      shapes['vocab_size'], shapes['hidden_size'], shapes['max_position_embeddings'],
      shapes['type_vocab_size'], dropout_rate=0.0)
  text_params = {k: v for k, v in sub(paths['embeddings']).items()
                 if k in ('word_embeddings', 'position_embeddings', 'token_type_embeddings',
                          'norm')}  # VisualBERT keeps its region params beside these
  x, _ = embeddings.apply({'params': text_params}, ids, types)
  layer = layers.TransformerLayer(shapes['num_attention_heads'], shapes['intermediate_size'],
                                  dropout_rate=0.0, attention_dropout_rate=0.0)
  for path in paths['layers']:
    x, _ = layer.apply({'params': sub(path)}, x, mask)
  pooled = None
  if paths.get('pooler'):
    pooled = layers.Pooler(shapes['hidden_size']).apply({'params': sub(paths['pooler'])}, x)
  return x, pooled


@pytest.mark.parametrize('design', DESIGNS)
def test_bert_weights_reproduce_bert_text_outputs(design, tmp_path):
  cfg = tiny_config(design)
  params = random_params(cfg)
  paths, shapes = text_shapes(cfg, params)
  bert = save_random_bert(tmp_path, **shapes)
  loaded = hf.import_bert(cfg, tmp_path, params)

  ids, mask, types = text_inputs(shapes['vocab_size'])
  forward = jax.jit(functools.partial(text_forward, paths=paths, shapes=shapes))
  text, pooled = forward(loaded, ids, mask, types)
  with torch.no_grad():
    expected = bert(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long(),
                    token_type_ids=torch.from_numpy(types).long())
  diff = float(np.abs(np.asarray(text) - expected.last_hidden_state.numpy()).max())
  print(f'\n{design}: BERT-initialised text layers vs BertModel max|diff| = {diff:.2e}')
  assert diff <= TOL
  if pooled is not None:
    np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), atol=TOL)

  # Exactly the text params changed (and VisualBERT's region tables, copies of
  # the loaded text tables: test_visualbert_region_tables_copy_the_loaded_bert);
  # everything else is as it was.
  text_prefixes = (paths['embeddings'] + '/', *(p + '/' for p in paths['layers']),
                   *([paths['pooler'] + '/'] if paths.get('pooler') else []))
  before, after = flat(params), flat(loaded)
  assert before.keys() == after.keys()
  # VisualBERT's joint embeddings also hold its region params.
  region_tables = (f'{paths["embeddings"]}/region_position_embeddings',
                   f'{paths["embeddings"]}/region_token_type_embeddings')
  for key, value in before.items():
    copied = key in region_tables
    region = copied or key.startswith(f'{paths["embeddings"]}/feature_projection/')
    is_text = key.startswith(text_prefixes) and (
        not region or copied and cfg.get('special_visual_initialize', False))
    assert np.array_equal(value, after[key]) != is_text, key


@pytest.mark.parametrize('pretraining', [False, True])
def test_visualbert_region_tables_copy_the_loaded_bert(pretraining, tmp_path):
  """special_visual_initialize (uclanlp/visualbert): the region (HF: visual)
  position and token-type tables are copies of BERT's loaded tables, not of the
  random ones."""
  cfg = tiny_config('visualbert')
  assert cfg.special_visual_initialize
  params = random_params(cfg, pretraining=pretraining)
  backbone = lambda p: p['backbone'] if pretraining else p
  paths, shapes = text_shapes(cfg, backbone(params))
  save_random_bert(tmp_path, **shapes)
  bert = sd.read_state_dict(tmp_path)
  embeddings = paths['embeddings']
  pairs = (('region_position_embeddings', 'embeddings.position_embeddings.weight'),
           ('region_token_type_embeddings', 'embeddings.token_type_embeddings.weight'))
  for region, bert_key in pairs:  # so that the check below can fail
    assert not np.allclose(backbone(params)[embeddings][region], bert[bert_key])
  loaded = hf.import_bert(cfg, tmp_path, params)
  for region, bert_key in pairs:
    np.testing.assert_array_equal(backbone(loaded)[embeddings][region], bert[bert_key],
                                  err_msg=region)
  # Without special visual initialisation the region tables stay as they were.
  cfg.special_visual_initialize = False
  kept = hf.import_bert(cfg, tmp_path, params)
  for region, _ in pairs:
    np.testing.assert_array_equal(backbone(kept)[embeddings][region],
                                  backbone(params)[embeddings][region], err_msg=region)


def test_pretraining_params_and_extra_bert_layers(tmp_path):
  cfg = tiny_config('lxmert')
  params = random_params(cfg, pretraining=True)
  paths, shapes = text_shapes(cfg, params['backbone'])
  shapes['num_hidden_layers'] += 1  # a deeper BERT: its last layer is left out
  save_random_bert(tmp_path, **shapes)
  loaded = hf.import_bert(cfg, tmp_path, params)
  np.testing.assert_array_equal(loaded['mlm_head']['bias'], params['mlm_head']['bias'])
  bert = sd.read_state_dict(tmp_path)
  np.testing.assert_array_equal(
      flat(loaded['backbone'])[f'{paths["layers"][-1]}/ffn/output/bias'],
      bert[f'encoder.layer.{len(paths["layers"]) - 1}.output.dense.bias'])


def test_shapes_that_do_not_fit_are_errors(tmp_path):
  cfg = tiny_config('visualbert')
  params = random_params(cfg)
  _, shapes = text_shapes(cfg, params)
  too_shallow = dict(shapes, num_hidden_layers=shapes['num_hidden_layers'] - 1)
  save_random_bert(tmp_path / 'shallow', **too_shallow)
  with pytest.raises(sd.CheckpointMismatchError, match=r'missing keys.*encoder\.layer\.1\.'):
    hf.import_bert(cfg, tmp_path / 'shallow', params)
  # Same number of values in every table, other shapes: must not load by reshaping.
  reshaped = dict(shapes, vocab_size=2 * shapes['vocab_size'],
                  hidden_size=shapes['hidden_size'] // 2,
                  intermediate_size=shapes['intermediate_size'] * 2,
                  max_position_embeddings=shapes['max_position_embeddings'] * 2)
  save_random_bert(tmp_path / 'narrow', **reshaped)
  with pytest.raises(sd.CheckpointMismatchError,
                     match=r'embeddings\.word_embeddings\.weight: checkpoint shape \(240, 32\)'):
    hf.import_bert(cfg, tmp_path / 'narrow', params)
  # A vocabulary one word longer fits the same padded table, but is not this
  # config's: an error, not a silent load into the padding rows.
  save_random_bert(tmp_path / 'longer', **dict(shapes, vocab_size=shapes['vocab_size'] + 1))
  with pytest.raises(sd.CheckpointMismatchError,
                     match=r'checkpoint shape \(121, 64\) does not fit .*\(128, 64\) \(a '
                           r'vocabulary of 120, config\.model\.vocab_size, padded\)'):
    hf.import_bert(cfg, tmp_path / 'longer', params)
