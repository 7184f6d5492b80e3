"""Captioning (`vlpjax.tasks.caption`): the seq2seq mask, the KV cache against
recomputation for every design, the losses, and a fine-tune on the tiny world
that writes the results file and loads."""
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import task_testing as tt
from test_finetune import tiny_config
import vlpjax
from vlpjax import caption as caption_cli
from vlpjax.evaluators import caption_metrics
from vlpjax.models import layers
from vlpjax.tasks import caption

DESIGNS = ('visualbert', 'vilbert', 'lxmert', 'uniter')
LOC_DIM = dict(visualbert=4, vilbert=5, lxmert=4, uniter=7)
B, T, R = 2, 10, 5


def model_and_params(design, seed=0, **fields):
  """A tiny CaptionModel (dropout off, model config `fields`), random params,
  random regions [B, R]."""
  config = importlib.import_module(f'configs.{design}').model_config('tiny')
  config.update(dropout_rate=0.0, attention_dropout_rate=0.0, **fields)
  model = caption.build_model(config)
  keys = jax.random.split(jax.random.key(seed), 3)
  region_mask = (np.arange(R)[None] < np.array([[R], [R - 2]])).astype(np.int32)
  regions = dict(region_feats=jax.random.normal(keys[0], (B, R, config.feature_dim)),
                 region_loc=jax.random.uniform(keys[1], (B, R, LOC_DIM[design])),
                 region_mask=jnp.asarray(region_mask))
  ids = jnp.asarray(np.asarray(jax.random.randint(keys[2], (B, T), 5, config.vocab_size)))
  params = nn.meta.unbox(model.init(
      jax.random.key(1), ids, jnp.ones((B, T), jnp.int32), jnp.zeros_like(ids),
      **regions, positions=jnp.zeros((B, 1), jnp.int32),
      attention_mask=caption.seq2seq_mask(T, R))['params'])
  return config, model, params, regions, ids


def run_config(model_config, objective='next_token', beam_size=1, decoding_kind='cache',
               max_len=None):
  return ml_collections.ConfigDict(dict(
      model=model_config, data=dict(max_text_len=T),
      caption=dict(caption.default_caption_config(), objective=objective, beam_size=beam_size,
                   decoding=decoding_kind, max_len=max_len)))


def test_seq2seq_mask():
  mask = caption.seq2seq_mask(3, 2)[0]
  expected = np.array([[1, 0, 0, 1, 1],
                       [1, 1, 0, 1, 1],
                       [1, 1, 1, 1, 1],
                       [0, 0, 0, 1, 1],
                       [0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(mask, expected)


# ViLBERT with two repeats of its [text, vision, Co-TRM] segment, which
# `scan_layers` scans (tiny has none).
VILBERT_SEGMENTS = dict(num_layers=5, v_num_layers=3, v_biattention_id=[0, 1, 2],
                        t_biattention_id=[2, 3, 4])


@pytest.mark.parametrize('design,fields', [
    *((d, {}) for d in DESIGNS), *((d, dict(scan_layers=True)) for d in DESIGNS),
    ('vilbert', dict(VILBERT_SEGMENTS, scan_layers=True))])
def test_prefill_then_steps_give_the_full_forward(design, fields):
  """Slot t's hidden state from the cache (prefill of [CLS], then one token a
  step) equals that of the whole sequence under the seq2seq mask; with
  scanned layers too (their caches stacked)."""
  config, model, params, regions, ids = model_and_params(design, **fields)
  full_mask = jnp.asarray(caption.seq2seq_mask(T, R))
  ones = jnp.ones((B, T), jnp.int32)
  everywhere = jnp.broadcast_to(jnp.arange(T), (B, T))
  full = model.apply({'params': params}, ids, ones, jnp.zeros_like(ids), **regions,
                     positions=everywhere, attention_mask=full_mask)['logits']
  prompt = ids.at[:, 1:].set(0)
  out, variables = model.apply(
      {'params': params}, prompt, ones, jnp.zeros_like(ids), **regions,
      positions=jnp.zeros((B, 1), jnp.int32), attention_mask=full_mask,
      decoding=layers.Decoding.prefill(), mutable=['cache'])
  stepped = [out['logits'][:, 0]]
  for t in range(1, T):
    out, variables = model.apply(
        {'params': params, 'cache': variables['cache']}, ids[:, t:t + 1], ones,
        jnp.zeros((B, 1), jnp.int32), **regions, positions=jnp.zeros((B, 1), jnp.int32),
        attention_mask=full_mask[:, t:t + 1], decoding=layers.Decoding.step_at(t),
        mutable=['cache'])
    stepped.append(out['logits'][:, 0])
  np.testing.assert_allclose(np.stack(stepped, 1)[..., :config.vocab_size],
                             np.asarray(full)[..., :config.vocab_size], atol=2e-5, rtol=1e-5)


def test_a_step_needs_a_mask_and_a_prefill():
  config, model, params, regions, ids = model_and_params('uniter')
  ones = jnp.ones((B, T), jnp.int32)
  step = functools.partial(model.apply, mutable=['cache'], decoding=layers.Decoding.step_at(1))
  with pytest.raises(ValueError, match='needs attention_mask'):
    model.apply({'params': params}, ids[:, 1:2], ones, jnp.zeros((B, 1), jnp.int32), **regions,
                positions=jnp.zeros((B, 1), jnp.int32), attention_mask=None,
                decoding=layers.Decoding.step_at(1), mutable=['cache'])
  with pytest.raises(ValueError, match='no cached keys'):
    step({'params': params}, ids[:, 1:2], ones, jnp.zeros((B, 1), jnp.int32), **regions,
         positions=jnp.zeros((B, 1), jnp.int32),
         attention_mask=jnp.asarray(caption.seq2seq_mask(T, R))[:, 1:2])
  del config


def decode(design, objective, beam_size, kind, max_len=None):
  config, model, params, regions, _ = model_and_params(design)
  run = run_config(config, objective, beam_size, kind, max_len)
  return jax.jit(lambda p, r: caption.decode_batch(model, p, r, run))(params, regions)


@pytest.mark.parametrize('design', DESIGNS)
def test_cached_decoding_equals_recomputing_the_prefix(design):
  """Greedy and beam-3 decoding: the same tokens, log-probabilities within 1e-5."""
  for beam_size in (1, 3):
    cached = decode(design, 'next_token', beam_size, 'cache')
    recomputed = decode(design, 'next_token', beam_size, 'recompute')
    np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
    np.testing.assert_array_equal(cached.lengths, recomputed.lengths)
    np.testing.assert_allclose(cached.log_prob, recomputed.log_prob, atol=1e-5)
    assert cached.tokens.shape == (B, T - 1)


@pytest.mark.parametrize('design', [
    'uniter', *(pytest.param(d, marks=pytest.mark.slow) for d in ('visualbert', 'vilbert',
                                                                  'lxmert'))])
def test_masked_objective_decodes_alike_cached_and_recomputed(design):
  """'masked' steps feed (token, [MASK]) and read the [MASK]'s prediction."""
  cached = decode(design, 'masked', 2, 'cache')
  recomputed = decode(design, 'masked', 2, 'recompute')
  np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
  np.testing.assert_allclose(cached.log_prob, recomputed.log_prob, atol=1e-5)
  assert cached.tokens.shape == (B, T - 2)


def test_max_len_is_checked_against_the_text_slots():
  config = run_config(ml_collections.ConfigDict(), max_len=T)
  with pytest.raises(ValueError, match=r'caption.max_len=10 must be in \[1, 9\]'):
    caption.resolve_max_len(config)
  config.caption.objective = 'masked'
  config.caption.max_len = None
  assert caption.resolve_max_len(config) == T - 2


# ----------------------------------------------------------------------------
# Losses.


def test_next_token_loss_by_hand():
  input_ids = jnp.array([[101, 7, 8, 102, 0]])
  text_mask = jnp.array([[1, 1, 1, 1, 0]])
  positions, targets, weights = caption.shifted_targets(input_ids, text_mask)
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(targets, [[7, 8, 102, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 1, 0]])
  vocab, padded = 110, 128
  logits = jax.random.normal(jax.random.key(0), (1, 4, padded))
  logits = logits.at[..., vocab:].set(jnp.finfo(jnp.float32).min)
  log_probs = np.asarray(jax.nn.log_softmax(logits[..., :vocab]))
  expected = -np.mean([log_probs[0, p, t] for p, t in enumerate([7, 8, 102])])
  got = caption.token_loss(logits, targets, weights, 0.0, vocab)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Label smoothing 0.1 over the 110 words only: 0.9 + 0.1/110 on the target.
  smooth = -np.mean([0.9 * log_probs[0, p, t] + 0.1 / vocab * log_probs[0, p].sum()
                     for p, t in enumerate([7, 8, 102])])
  np.testing.assert_allclose(caption.token_loss(logits, targets, weights, 0.1, vocab), smooth,
                             rtol=1e-5)


def test_masked_objective_masks_caption_tokens_only():
  config = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=200), data=dict(max_text_len=8),
      caption=caption.default_caption_config()))
  input_ids = jnp.tile(jnp.array([[101, 7, 8, 9, 10, 102, 0, 0]]), (64, 1))
  batch = dict(input_ids=input_ids, text_mask=(input_ids > 0).astype(jnp.int32),
               token_type_ids=jnp.zeros_like(input_ids),
               region_feats=jnp.zeros((64, 3, 4)), region_loc=jnp.zeros((64, 3, 4)),
               region_mask=jnp.ones((64, 3), jnp.int32))
  kwargs, targets = caption.make_inputs(config, batch, jax.random.key(0), 'masked')
  picked = np.asarray(kwargs['positions'])[np.asarray(targets['weights']) > 0]
  assert picked.size and set(picked.tolist()) <= {1, 2, 3, 4, 5}  # [SEP] too, never [CLS]
  assert 5 in picked  # the [SEP] is learnt: captions must end
  assert np.asarray(targets['weights']).sum(1).max() <= caption.MAX_MASKED
  assert kwargs['attention_mask'].shape == (1, 11, 11)


# ----------------------------------------------------------------------------
# Fine-tuning on the tiny world.


def test_world_caption_splits_have_disjoint_images(data_config):
  images = {}
  for split in ('train', 'validation', 'test'):
    source = tfds.data_source('vlp_world/tiny_captions', data_dir=data_config.data_dir)[split]
    images[split] = {int(source[i]['image_index']) for i in range(len(source))}
  assert all(images.values())
  assert not images['train'] & images['validation']
  assert not images['train'] & images['test'] and not images['validation'] & images['test']


def test_finetune_captions_every_image_once_and_loads(data_config, tmp_path):
  workdir = str(tmp_path)
  config = tiny_config('visualbert', data_config.data_dir, 'caption')
  config.evals.caption_val.num_images = 0
  config, final, records = tt.finetune(config, workdir, num_steps=4, eval_batch=8)
  assert np.isfinite(final['next_token'])
  logged = [r for r in records if 'caption_val/count' in r]
  assert [r['step'] for r in logged] == [1, 2, 4]
  images = caption.open_images(config.data, 'visualbert', 'validation')
  assert logged[-1]['caption_val/count'] == len(images) and len(images) % 8
  assert {'caption_val/BLEU-4', 'caption_val/CIDEr', 'caption_val/ROUGE_L'} <= set(logged[-1])
  results = tt.predictions_of(workdir, 'caption_val', 4)
  assert [r['image_id'] for r in results] == list(images.image_ids)
  assert all(set(r) == {'image_id', 'caption'} for r in results)
  # `vlpjax.load` captions an image as the evaluator did.
  model = vlpjax.load(workdir)
  rows, image = tt.rows_of_first_image(data_config.data_dir, 'tiny_captions')
  assert model.caption([tt.image_inputs(image)]) == [results[0]['caption']]
  assert rows[0]['image_index'] == images.image_index[0]
  # `python -m vlpjax.caption` on a table of images: every image once, as `load` captions it.
  source = tfds.data_source('vlp_world/tiny_images', data_dir=data_config.data_dir)['train']
  path = caption_cli.caption_table(workdir, 'vlp_world/tiny_images',
                                   data_dir=data_config.data_dir, num_images=3, batch_size=2)
  written = caption_metrics.read_results(path)
  ids = [caption_cli.results_image_id(source[i]['image_id']) for i in range(3)]
  assert list(written) == ids
  assert list(written.values()) == model.caption([tt.image_inputs(source[i]) for i in range(3)],
                                                 batch_size=2)
  # One program for any number of images: the predictor pads its last batch.
  compiled = model._decode._cache_size()  # pylint: disable=protected-access
  assert len(model.caption([tt.image_inputs(source[0])], batch_size=2)) == 1
  assert model._decode._cache_size() == compiled  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='not --split'):
    caption_cli.caption_table(workdir, 'vlp_world/tiny_images', data_dir=data_config.data_dir,
                              split='nope')



def test_config_recipes_and_evaluators():
  small = importlib.import_module('configs.lxmert').get_config('small,task=caption')
  assert small.task == 'caption' and small.caption.beam_size == 1
  assert small.train.num_steps == caption.WORLD_RECIPE['num_steps']
  assert small.evals.caption_val.num_images == caption.WORLD_EVAL_IMAGES
  assert small.evals.caption_test.log_steps == small.train.num_steps
  base = importlib.import_module('configs.uniter').get_config('base,task=caption')
  assert base.caption.beam_size == caption.PUBLISHED_BEAM
  assert base.data.max_text_len == 1 + caption.PUBLISHED_MAX_LEN
  assert base.evals.caption_test.num_images == 0 and base.evals.caption_test.type == 'caption'
