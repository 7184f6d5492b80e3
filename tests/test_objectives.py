"""Pretraining objectives: masking statistics, losses against numpy, the per-design mix."""
import functools
import importlib
import math
import os

import jax
import jax.numpy as jnp
import flax
import ml_collections
import numpy as np
import pytest

from vlpjax.models import get_design
from vlpjax.objectives import masking, matching, mlm, pretraining, qa, region

MASK, CLS, SEP, PAD = 4, 2, 3, 0
# The objectives work with any key type; 'rbg' keys compile several times faster
# on CPU than threefry ones (`masking.step_rng`, tested below, keeps threefry).
KEY = functools.partial(jax.random.key, impl='rbg')
SPECIAL = (PAD, CLS, SEP)
VOCAB = 1000


def _text(batch, length, lengths):
  """[CLS] words [SEP] padded with 0; words are ids >= 10."""
  rng = np.random.default_rng(0)
  ids = np.zeros((batch, length), np.int32)
  for b, n in enumerate(lengths):
    ids[b, 0] = CLS
    ids[b, 1:n - 1] = rng.integers(10, VOCAB, n - 2)
    ids[b, n - 1] = SEP
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


# Jitted: one compile instead of one per eager op.
_jit_mask_tokens = jax.jit(masking.mask_tokens, static_argnames=(
    'mask_token_id', 'special_token_ids', 'vocab_size', 'max_predictions', 'mask_prob',
    'random_token_min', 'at_least_one'))


def _mask_tokens(ids, mask, rng=0, **kw):
  kw = dict(dict(mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=VOCAB,
                 max_predictions=ids.shape[1]), **kw)
  key = KEY(rng) if isinstance(rng, int) else rng
  return _jit_mask_tokens(key, jnp.asarray(ids), jnp.asarray(mask), **kw)


# ---------------------------------------------------------------- text masking

def test_token_masking_rates_and_80_10_10():
  lengths = np.random.default_rng(1).integers(3, 33, 3000)
  ids, mask = _text(3000, 32, lengths)
  out = _mask_tokens(ids, mask)
  new_ids, positions, targets, weights = map(np.asarray, out)
  used = weights > 0
  candidates = (mask > 0) & ~np.isin(ids, SPECIAL)
  assert abs(used.sum() / candidates.sum() - 0.15) < 0.01
  # Predicted slots point at candidates and hold the original ids.
  rows = np.nonzero(used)[0]
  assert candidates[rows, positions[used]].all()
  np.testing.assert_array_equal(targets[used], ids[rows, positions[used]])
  after = new_ids[rows, positions[used]]
  to_mask = np.mean(after == MASK)
  kept = np.mean(after == targets[used])
  random = 1.0 - to_mask - kept
  assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015
  # Everything else is untouched: padding, specials, unpicked tokens.
  predicted = np.zeros_like(candidates)
  predicted[rows, positions[used]] = True
  np.testing.assert_array_equal(new_ids[~predicted], ids[~predicted])


def test_token_masking_is_deterministic_in_the_rng():
  ids, mask = _text(8, 16, [16] * 8)
  a = _mask_tokens(ids, mask, rng=masking.step_rng(3, 7))
  b = _mask_tokens(ids, mask, rng=masking.step_rng(3, 7))
  c = _mask_tokens(ids, mask, rng=masking.step_rng(3, 8))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.input_ids, c.input_ids)


def test_token_masking_caps_predictions_and_leaves_the_rest():
  ids, mask = _text(4, 12, [12, 12, 6, 3])
  out = _mask_tokens(ids, mask, max_predictions=3, mask_prob=1.0)
  np.testing.assert_array_equal(np.asarray(out.weights).sum(axis=1), [3, 3, 3, 1])
  changed = np.asarray(out.input_ids) != ids
  used = np.asarray(out.weights) > 0
  for b in range(4):
    slots = set(np.asarray(out.positions)[b][used[b]])
    assert set(np.nonzero(changed[b])[0]) <= slots  # only predicted tokens changed
    assert all(0 < p < [12, 12, 6, 3][b] - 1 for p in slots)
    assert list(np.asarray(out.positions)[b][used[b]]) == sorted(slots)


def test_token_masking_at_least_one_masks_the_first_word():
  ids, mask = _text(3, 8, [8, 5, 2])  # the last row has no word at all
  out = _mask_tokens(ids, mask, mask_prob=0.0, at_least_one=True)
  np.testing.assert_array_equal(np.asarray(out.weights).sum(axis=1), [1, 1, 0])
  np.testing.assert_array_equal(np.asarray(out.input_ids)[:2, 1], [MASK, MASK])
  np.testing.assert_array_equal(np.asarray(out.targets)[:2, 0], ids[:2, 1])
  np.testing.assert_array_equal(np.asarray(out.input_ids)[2], ids[2])


def test_random_words_respect_the_minimum_id():
  ids, mask = _text(400, 16, [16] * 400)
  out = _mask_tokens(ids, mask, mask_prob=1.0, random_token_min=900)
  new = np.asarray(out.input_ids)
  replaced = (new != ids) & (new != MASK)
  assert replaced.sum() > 300
  assert new[replaced].min() >= 900 and new[replaced].max() < VOCAB


def test_default_max_predictions_rarely_truncates():
  for length in (20, 40, 128):
    slots = masking.default_max_predictions(length)
    tail = sum(math.comb(length, k) * 0.15**k * 0.85**(length - k)
               for k in range(slots + 1, length + 1))
    assert tail < 0.01, (length, slots, tail)
    assert slots <= 0.4 * length


def test_bad_max_predictions_is_an_error():
  ids, mask = _text(2, 6, [6, 6])
  with pytest.raises(ValueError, match='max_predictions'):
    _mask_tokens(ids, mask, max_predictions=7)


# -------------------------------------------------------------- region masking

def _regions(batch, regions, counts, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(batch, regions, dim)).astype(np.float32) + 3.0
  region_mask = (np.arange(regions)[None] < np.asarray(counts)[:, None]).astype(np.int32)
  return feats, region_mask


def test_region_picking_rate_padding_img_and_at_least_one():
  counts = np.random.default_rng(2).integers(1, 21, 4000)
  _, region_mask = _regions(4000, 20, counts)
  picked = np.asarray(masking.pick_regions(KEY(0), region_mask))
  assert not picked[region_mask == 0].any()
  assert abs(picked.sum() / region_mask.sum() - 0.15) < 0.01
  vil = np.asarray(masking.pick_regions(KEY(0), region_mask, skip_first=True))
  assert not vil[:, 0].any()
  one = np.asarray(masking.pick_regions(KEY(1), region_mask, mask_prob=0.0,
                                        at_least_one=True))
  np.testing.assert_array_equal(one.sum(axis=1), 1)
  assert not one[region_mask == 0].any()
  # The forced region is drawn at random among the real ones.
  assert len(set(np.argmax(one[counts == 20], axis=1))) > 10


def test_uniter_zero_fill():
  feats, region_mask = _regions(2, 4, [4, 2])
  picked = np.array([[True, False, False, True], [False, True, False, False]])
  out = np.asarray(masking.zero_regions(jnp.asarray(feats), jnp.asarray(picked)))
  np.testing.assert_array_equal(out[picked], 0.0)
  np.testing.assert_array_equal(out[~picked], feats[~picked])


def test_lxmert_region_masking_80_10_10_from_real_regions():
  counts = np.random.default_rng(3).integers(1, 9, 600)
  feats, region_mask = _regions(600, 8, counts)
  feats[region_mask == 0] = 1e6  # a padded feature must never be drawn
  picked = region_mask.astype(bool)
  out = np.asarray(masking.lxmert_mask_regions(KEY(0), jnp.asarray(feats),
                                               jnp.asarray(region_mask), jnp.asarray(picked)))
  group = masking.DONOR_GROUP
  real_rows = [{tuple(r) for r in feats[g:g + group][region_mask[g:g + group] > 0]}
               for g in range(0, 600, group)]
  got = out[picked]
  zero = np.all(got == 0, axis=1)
  kept = np.all(got == feats[picked], axis=1)
  swapped = ~zero & ~kept
  assert abs(zero.mean() - 0.8) < 0.02 and abs(kept.mean() - 0.1) < 0.02
  assert abs(swapped.mean() - 0.1) < 0.02
  # Donors are real regions of the example's own group of DONOR_GROUP examples.
  example = np.nonzero(picked)[0]
  assert all(tuple(r) in real_rows[b // group] for r, b in zip(got[swapped], example[swapped]))
  donors_elsewhere = [tuple(r) in real_rows[(b // group + 1) % len(real_rows)]
                      for r, b in zip(got[swapped], example[swapped])]
  assert not any(donors_elsewhere)
  np.testing.assert_array_equal(out[~picked], feats[~picked])


def test_vilbert_region_masking_and_img_mean():
  counts = np.random.default_rng(4).integers(2, 9, 600)
  feats, region_mask = _regions(600, 8, counts)
  picked = region_mask.astype(bool)
  picked[:, 0] = False
  out = np.asarray(masking.vilbert_mask_regions(KEY(0), jnp.asarray(feats),
                                                jnp.asarray(region_mask), jnp.asarray(picked)))
  got = out[picked]
  zero = np.all(got == 0, axis=1)
  assert abs(zero.mean() - 0.9) < 0.02
  np.testing.assert_array_equal(got[~zero], feats[picked][~zero])
  for b in range(5):
    expected = out[b, 1:counts[b]].mean(axis=0)
    np.testing.assert_allclose(out[b, 0], expected, rtol=1e-5)


# ----------------------------------------------------------------------- losses

def _log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _ce(logits, labels):
  return -np.take_along_axis(_log_softmax(logits), labels[..., None], axis=-1)[..., 0]


def test_mlm_loss_is_a_token_mean():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(3, 4, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (3, 4))
  weights = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
  expected = _ce(logits, targets)[weights > 0].mean()
  np.testing.assert_allclose(mlm.masked_lm_loss(logits, targets, weights), expected, rtol=1e-6)
  assert float(mlm.masked_lm_loss(logits, targets, np.zeros_like(weights))) == 0.0


def test_matching_loss_and_label_conventions():
  logits = np.array([[2.0, -1.0], [0.5, 0.25], [-3.0, 1.0]], np.float32)
  labels = np.array([0, 1, 1])
  np.testing.assert_allclose(matching.matching_loss(logits, labels),
                             _ce(logits, labels).mean(), rtol=1e-6)
  # ViLBERT's alignment label 0 = aligned; the others' 1 = matched.
  np.testing.assert_array_equal(get_design('vilbert').is_matched(jnp.array([0, 1])),
                                [True, False])
  for design in ('visualbert', 'lxmert', 'uniter'):
    np.testing.assert_array_equal(get_design(design).is_matched(jnp.array([0, 1])),
                                  [False, True])


def test_uniter_region_losses():
  rng = np.random.default_rng(6)
  pred, target = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  weights = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  sel = weights > 0
  np.testing.assert_allclose(region.mrfr_loss(pred, target, weights),
                             np.mean((pred[sel] - target[sel]) ** 2), rtol=1e-5)
  # Background (class 0) is the most likely class everywhere but never the label.
  probs = rng.dirichlet(np.ones(7), size=(2, 3))
  probs[..., 0] += 5
  probs /= probs.sum(-1, keepdims=True)
  labels = np.asarray(region.mrc_labels(jnp.asarray(probs)))
  np.testing.assert_array_equal(labels, np.argmax(probs[..., 1:], axis=-1) + 1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  np.testing.assert_allclose(region.mrc_loss(logits, labels, weights),
                             _ce(logits, labels)[sel].mean(), rtol=1e-5)
  probs[0, 0, 3] = 0.0  # zero-probability classes contribute nothing
  kl = np.sum(np.where(probs > 0, probs * (np.log(np.where(probs > 0, probs, 1))
                                           - _log_softmax(logits)), 0.0), axis=-1)
  # UNITER: elementwise mean over regions x classes; ViLBERT: per-region sum.
  np.testing.assert_allclose(region.mrc_kl_loss(logits, probs, weights),
                             kl[sel].mean() / 7, rtol=1e-5)
  np.testing.assert_allclose(region.vilbert_region_loss(logits, probs, weights),
                             kl[sel].mean(), rtol=1e-5)


def test_lxmert_visual_losses_match_the_original_formula():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 4, 9)).astype(np.float32)
  labels = rng.integers(0, 9, (2, 4))
  conf = rng.uniform(size=(2, 4)).astype(np.float32)
  full = np.ones((2, 4), np.int32)
  # (CE * conf).mean() / 0.15 over all B * R regions, as LXRTPretraining computes it.
  expected = (_ce(logits, labels) * conf).mean() / 0.15
  np.testing.assert_allclose(region.lxmert_label_loss(logits, labels, conf, full, full),
                             expected, rtol=1e-5)
  # Padded regions and unlabelled (-1) ones drop out; the mean is over real regions.
  region_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  labels[1, 2] = -1
  keep = (region_mask > 0) & (labels >= 0)
  expected = (_ce(logits, np.maximum(labels, 0)) * conf * keep).sum() / 7 / 0.15
  np.testing.assert_allclose(region.lxmert_label_loss(logits, labels, conf, region_mask,
                                                      region_mask), expected, rtol=1e-5)
  # Feature regression: smooth-L1 averaged over dims, on masked regions.
  pred, target = rng.normal(size=(2, 4, 6)) * 2, rng.normal(size=(2, 4, 6))
  picked = np.array([[1, 0, 0, 1], [0, 1, 0, 0]])
  diff = np.abs(pred - target)
  smooth = np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean(-1)
  np.testing.assert_allclose(region.lxmert_feature_loss(pred, target, picked, full),
                             (smooth * picked).mean() / 0.15, rtol=1e-5)


def test_out_of_range_labels_are_loud_and_negative_ones_ignored():
  logits = np.zeros((1, 2, 5), np.float32)
  conf, region_mask = np.ones((1, 2)), np.ones((1, 2))
  # A label-space mismatch (e.g. ids counted with background) must not be clipped.
  assert np.isnan(region.lxmert_label_loss(logits, np.array([[1, 5]]), conf, region_mask,
                                           region_mask))
  np.testing.assert_allclose(
      region.lxmert_label_loss(logits, np.array([[1, -1]]), conf, region_mask, region_mask),
      np.log(5) / 2 / 0.15, rtol=1e-6)


def test_qa_answers_sampled_by_score():
  scores = np.tile(np.array([[0.0, 0.3, 0.6, 0.0, 0.9]], np.float32), (6000, 1))
  scores[-1] = 0.0  # no answer in the vocabulary
  valid = np.ones(6000, bool)
  valid[0] = False  # e.g. a mismatched pair
  labels, weights = map(np.asarray, qa.sample_answers(KEY(0), scores, valid))
  assert weights[0] == 0 and weights[-1] == 0 and weights[1:-1].all()
  freq = np.bincount(labels[1:-1], minlength=5) / 5998
  np.testing.assert_allclose(freq, [0, 1 / 6, 2 / 6, 0, 3 / 6], atol=0.02)
  logits = np.random.default_rng(8).normal(size=(4, 5)).astype(np.float32)
  lab, w = np.array([1, 2, 4, 0]), np.array([1, 0, 1, 0], np.float32)
  np.testing.assert_allclose(qa.qa_loss(logits, lab, w), _ce(logits, lab)[w > 0].mean(),
                             rtol=1e-6)


# ------------------------------------------------------------ per-design mixing

def _config(design, **pretrain):
  pre = pretraining.default_pretrain_config(design)
  pre.update(dict(mask_token_id=MASK, special_token_ids=SPECIAL, random_token_min=5))
  pre.update(pretrain)
  return ml_collections.ConfigDict(dict(model=dict(name=design, vocab_size=VOCAB), pretrain=pre))


def _batch(design, batch=4, length=10, regions=5, dim=6, classes=11, answers=7):
  rng = np.random.default_rng(9)
  ids, text_mask = _text(batch, length, [10, 8, 6, 10][:batch])
  feats, region_mask = _regions(batch, regions, [5, 3, 5, 4][:batch], dim)
  loc_dim = {'lxmert': 4, 'vilbert': 5, 'uniter': 7, 'visualbert': 4}[design]
  probs = rng.dirichlet(np.ones(classes), size=(batch, regions)).astype(np.float32)
  scores = np.zeros((batch, answers), np.float32)
  scores[:, 2] = 1.0
  return dict(
      input_ids=ids, text_mask=text_mask, token_type_ids=np.zeros_like(ids),
      region_feats=feats, region_loc=rng.uniform(size=(batch, regions, loc_dim)).astype(np.float32),
      region_mask=region_mask, match_label=np.array([1, 0, 1, 0][:batch], np.int32),
      object_ids=rng.integers(0, classes - 1, (batch, regions)).astype(np.int32),
      object_conf=rng.uniform(size=(batch, regions)).astype(np.float32),
      attr_ids=rng.integers(0, 4, (batch, regions)).astype(np.int32),
      attr_conf=rng.uniform(size=(batch, regions)).astype(np.float32),
      class_probs=probs, answer_scores=scores, qa_valid=np.ones(batch, np.float32))


def _make_inputs(design, batch, task, config, rng=0):
  """`make_inputs` jitted (one compile instead of one per eager op)."""
  run = jax.jit(lambda b, r: pretraining.make_inputs(design, b, r, task, config))
  return run({k: jnp.asarray(v) for k, v in batch.items()}, KEY(rng))


def test_sample_task_is_deterministic_and_follows_ratios():
  ratios = pretraining.task_ratios(_config("uniter"), 0)
  assert ratios == {'itm': 2.0, 'mlm': 2.0, 'mrfr': 1.0, 'mrckl': 1.0}
  draws = [pretraining.sample_task(0, step, ratios) for step in range(3000)]
  assert draws == [pretraining.sample_task(0, step, dict(reversed(list(ratios.items()))))
                   for step in range(3000)]
  freq = {t: draws.count(t) / 3000 for t in ratios}
  for task, expected in (('itm', 1 / 3), ('mlm', 1 / 3), ('mrfr', 1 / 6), ('mrckl', 1 / 6)):
    assert abs(freq[task] - expected) < 0.03, freq
  assert draws != [pretraining.sample_task(1, step, ratios) for step in range(3000)]


def test_first_stage_draws_by_its_own_ratios():
  config = _config('uniter', first_stage_steps=50, first_stage_ratios=(1, 0, 0, 0))
  assert pretraining.tasks_for('uniter', config) == ['itm', 'mlm', 'mrfr', 'mrckl']
  draws = [pretraining.sample_task(0, step, pretraining.task_ratios(config, step))
           for step in range(1000)]
  assert set(draws[:50]) == {'itm'}
  assert set(draws[50:]) == {'itm', 'mlm', 'mrfr', 'mrckl'}
  assert draws[50:] == [pretraining.sample_task(0, step, pretraining.task_ratios(_config('uniter'), 0))
                        for step in range(50, 1000)]
  with pytest.raises(ValueError, match=r'config.pretrain.first_stage_ratios \(1, 0\) must give'):
    pretraining.tasks_for('uniter', _config('uniter', first_stage_steps=5, first_stage_ratios=(1, 0)))
  # The world recipe (a `small` run) starts with matching alone.
  small = importlib.import_module('configs.uniter').get_config('small')
  assert small.pretrain.first_stage_steps > 0
  assert [t for t, r in pretraining.task_ratios(small, 0).items() if r] == ['itm']
  assert pretraining.task_ratios(small, small.pretrain.first_stage_steps) == {
      'itm': 2.0, 'mlm': 2.0, 'mrfr': 1.0, 'mrckl': 1.0}


def test_negatives_only_for_steps_with_matching():
  """UNITER's losses but ITM see positives only: its other steps' batches need
  no negatives; the other designs' MLM and region losses see mismatched pairs."""
  config = _config('uniter', first_stage_steps=5, first_stage_ratios=(1, 0, 0, 0))
  config.seed = 0
  steps = range(200)
  draws = [pretraining.draws_negatives('uniter', config, s) for s in steps]
  assert draws == [pretraining.task_for_step('uniter', config, s) == 'itm' for s in steps]
  assert all(draws[:5]) and 0 < sum(draws[5:]) < 195
  lxmert = _config('lxmert')
  lxmert.seed = 0
  assert all(pretraining.draws_negatives('lxmert', lxmert, s) for s in range(20))


def test_sum_mix_first_stage_sums_only_its_tasks():
  config = _config('lxmert', first_stage_steps=3, first_stage_ratios=(0, 1, 0, 0, 0, 0))
  config.seed = 0
  assert tuple(config.pretrain.tasks) == ('mlm', 'matched', 'obj', 'attr', 'feat', 'qa')
  assert pretraining.tasks_for('lxmert', config) == [pretraining.FIRST_STAGE, pretraining.ALL]
  assert pretraining.eval_tasks('lxmert', config) == [pretraining.ALL]
  assert [pretraining.task_for_step('lxmert', config, s) for s in range(5)] == [
      pretraining.FIRST_STAGE] * 3 + [pretraining.ALL] * 2
  batch = _batch('lxmert')
  kwargs, targets = _make_inputs('lxmert', batch, pretraining.FIRST_STAGE, config)
  assert 'mlm_targets' not in targets and 'answer_labels' not in targets
  rng = np.random.default_rng(0)
  outputs = {'matched_logits': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  total, losses = pretraining.compute_losses('lxmert', outputs, targets,
                                             pretraining.FIRST_STAGE, config)
  assert set(losses) == {'matched'}
  np.testing.assert_allclose(total, losses['matched'])
  with pytest.raises(ValueError, match='first_stage_ratios'):
    pretraining.tasks_for('lxmert', _config('lxmert', first_stage_steps=3,
                                            first_stage_ratios=(0, 1)))
  assert not any(pretraining.captions_only(config, s) for s in range(5))
  config.pretrain.first_stage_sentences = 'captions'
  assert [pretraining.captions_only(config, s) for s in range(5)] == [True] * 3 + [False] * 2
  config.pretrain.first_stage_sentences = 'questions'
  with pytest.raises(ValueError, match=r"first_stage_sentences must be one of \('all', "
                     r"'captions'\), got 'questions'"):
    pretraining.tasks_for('lxmert', config)


def test_tasks_for_and_config_errors():
  assert pretraining.tasks_for('lxmert', _config('lxmert')) == ['all']
  assert pretraining.tasks_for('uniter', _config('uniter')) == ['itm', 'mlm', 'mrfr', 'mrckl']
  with pytest.raises(ValueError, match='config.pretrain.tasks'):
    pretraining.tasks_for('vilbert', _config('vilbert', tasks=('mlm', 'itm')))
  with pytest.raises(ValueError, match="mix must be 'sample' for uniter"):
    pretraining.tasks_for('uniter', _config('uniter', mix='sum'))
  with pytest.raises(ValueError, match='config.pretrain.ratios'):
    pretraining.tasks_for('uniter', _config('uniter', ratios=(1, 1)))
  with pytest.raises(ValueError, match='not one of'):
    pretraining.make_inputs('lxmert', _batch('lxmert'), KEY(0), 'mlm',
                            _config('lxmert'))
  batch = _batch('vilbert')
  del batch['class_probs']
  with pytest.raises(KeyError, match='class_probs'):
    pretraining.make_inputs('vilbert', batch, KEY(0), 'all', _config('vilbert'))


def test_uniter_conditional_masking_and_positive_only():
  config, batch = _config('uniter'), _batch('uniter')
  kwargs, targets = _make_inputs('uniter', batch, 'mlm', config)
  np.testing.assert_array_equal(kwargs['region_feats'], batch['region_feats'])
  assert not np.asarray(kwargs['masked_regions']).any()
  weights = np.asarray(targets['mlm_weights'])
  assert (weights[[0, 2]].sum(axis=1) >= 1).all()  # at least one per positive pair
  assert not weights[[1, 3]].any()  # image-replaced negatives do not train MLM

  kwargs, targets = _make_inputs('uniter', batch, 'mrfr', config)
  np.testing.assert_array_equal(kwargs['input_ids'], batch['input_ids'])
  assert kwargs['mlm_positions'].shape == (4, 1)
  masked = np.asarray(kwargs['masked_regions'])
  assert (masked.sum(axis=1) >= 1).all() and not masked[batch['region_mask'] == 0].any()
  np.testing.assert_array_equal(np.asarray(kwargs['region_feats'])[masked], 0.0)
  np.testing.assert_array_equal(targets['raw_region_feats'], batch['region_feats'])
  np.testing.assert_array_equal(np.asarray(targets['region_weights'])[[1, 3]], 0.0)

  kwargs, _ = _make_inputs('uniter', batch, 'itm', config)
  np.testing.assert_array_equal(kwargs['input_ids'], batch['input_ids'])
  np.testing.assert_array_equal(kwargs['region_feats'], batch['region_feats'])


def _fake_outputs(design, kwargs, hidden=8, classes=11, answers=7, dim=6):
  """Random outputs of the shapes the model contract gives."""
  rng = np.random.default_rng(10)
  batch, regions = kwargs['region_mask'].shape
  length = kwargs['input_ids'].shape[1]
  slots = kwargs['mlm_positions'].shape[1]
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  out = dict(text=normal(batch, length, hidden), vision=normal(batch, regions, hidden),
             mlm_logits=normal(batch, slots, VOCAB))
  out.update({'visualbert': dict(sentence_image_logits=normal(batch, 2)),
              'vilbert': dict(alignment_logits=normal(batch, 2),
                              region_logits=normal(batch, regions, classes)),
              'lxmert': dict(matched_logits=normal(batch, 2),
                             obj_logits=normal(batch, regions, classes - 1),
                             attr_logits=normal(batch, regions, 4),
                             feat_pred=normal(batch, regions, dim),
                             qa_logits=normal(batch, answers)),
              'uniter': dict(itm_logits=normal(batch, 2), mrfr_pred=normal(batch, regions, dim),
                             mrc_logits=normal(batch, regions, classes))}[design])
  return out


@pytest.mark.parametrize('design,task,expected', [
    ('visualbert', 'all', {'mlm', 'sentence_image'}),
    ('vilbert', 'all', {'mlm', 'region_kl', 'alignment'}),
    ('lxmert', 'all', {'mlm', 'matched', 'obj', 'attr', 'feat', 'qa'}),
    ('uniter', 'itm', {'itm', 'wra'}),
    ('uniter', 'mlm', {'mlm'}),
    ('uniter', 'mrfr', {'mrfr'}),
    ('uniter', 'mrckl', {'mrckl'}),
])
def test_compute_losses_under_jit(design, task, expected):
  tasks = get_design(design).recipe.components
  config = _config(design, tasks=tasks, ratios=(1,) * len(tasks) if task != 'all' else ())
  batch = {k: jnp.asarray(v) for k, v in _batch(design).items()}

  @jax.jit
  def run(batch, rng):
    kwargs, targets = pretraining.make_inputs(design, batch, rng, task, config)
    return pretraining.compute_losses(design, _fake_outputs(design, kwargs), targets, task,
                                      config)

  total, losses = run(batch, KEY(0))
  assert set(losses) == expected
  weights = {'wra': 0.1}
  np.testing.assert_allclose(total, sum(weights.get(k, 1.0) * v for k, v in losses.items()),
                             rtol=1e-6)
  assert all(np.isfinite(v) and v != 0 for v in losses.values()), losses


def test_lxmert_qa_only_on_matched_pairs_with_answers():
  config, batch = _config('lxmert'), _batch('lxmert')
  batch['qa_valid'][2] = 0.0
  _, targets = _make_inputs('lxmert', batch, 'all', config)
  np.testing.assert_array_equal(targets['answer_weights'], [1, 0, 0, 0])
  np.testing.assert_array_equal(targets['answer_labels'][0], 2)



def test_lxmert_matched_loss_on_captions_only():
  """`pretrain.match_questions=False`: the matched loss is the cross-entropy over
  the pairs whose sentence is not a question; True (the original's rule, the
  default) scores every pair."""
  design = 'lxmert'
  batch = _batch(design)
  batch['shows_question'] = np.array([1, 0, 0, 1], np.float32)
  losses = {}
  for match_questions in (True, False):
    config = _config(design, tasks=('matched',), match_questions=match_questions)
    kwargs, targets = _make_inputs(design, batch, 'all', config)
    outputs = _fake_outputs(design, kwargs)
    _, losses[match_questions] = pretraining.compute_losses(design, outputs, targets, 'all',
                                                            config)
  per_pair = np.asarray(_ce(np.asarray(outputs['matched_logits']), batch['match_label']))
  np.testing.assert_allclose(losses[True]['matched'], per_pair.mean(), rtol=1e-6)
  np.testing.assert_allclose(losses[False]['matched'], per_pair[[1, 2]].mean(), rtol=1e-6)
  configs = importlib.import_module('configs.lxmert')
  assert configs.get_config('base').pretrain.match_questions  # the original's rule
  # The world's recipe: its templated questions fit almost any image.
  world = configs.get_config('small').pretrain
  assert not world.match_questions
  assert world.first_stage_sentences == 'captions' and world.first_stage_steps > 0
  assert configs.get_config('base').pretrain.first_stage_sentences == 'all'

def test_loss_weights_apply_and_unknown_names_fail():
  design = 'visualbert'
  config = _config(design, loss_weights={'sentence_image': 0.5})
  kwargs, targets = _make_inputs(design, _batch(design), 'all', config)
  total, losses = pretraining.compute_losses(design, _fake_outputs(design, kwargs), targets,
                                             'all', config)
  np.testing.assert_allclose(total, losses['mlm'] + 0.5 * losses['sentence_image'], rtol=1e-6)
  with pytest.raises(ValueError, match='loss_weights'):
    pretraining.compute_losses(design, _fake_outputs(design, kwargs), targets, 'all',
                               _config(design, loss_weights={'itm': 1.0}))


# ---------------------------------------------- end to end with the real models

def _design_config(design):
  root = os.path.join(os.path.dirname(__file__), '..')
  for path in (f'vlpjax/models/{design}.py', f'configs/{design}.py'):
    if not os.path.exists(os.path.join(root, path)):
      pytest.skip(f'{path} not written yet')
  return importlib.import_module(f'configs.{design}').model_config('tiny')


def _random_params(model, kwargs):
  """Params of `model` drawn N(0, 0.02) (LayerNorm scale 1, biases 0) without
  compiling `model.init`, which costs more than the test itself."""
  boxed = jax.eval_shape(lambda rng, kw: model.init(rng, **kw), KEY(0), kwargs)
  rng = np.random.default_rng(11)

  def draw(path, spec):
    name = path[-1].key
    if name in ('scale', 'bias'):
      return jnp.full(spec.shape, 1.0 if name == 'scale' else 0.0, spec.dtype)
    return jnp.asarray(rng.normal(0.0, 0.02, spec.shape), spec.dtype)

  return jax.tree_util.tree_map_with_path(draw, flax.core.meta.unbox(boxed)['params'])


@pytest.mark.parametrize('design,task', [
    ('visualbert', 'all'), ('vilbert', 'all'), ('lxmert', 'all'), ('uniter', 'itm'),
    # The other UNITER tasks reuse paths covered above (MLM head, region masking).
    pytest.param('uniter', 'mlm', marks=pytest.mark.slow),
    pytest.param('uniter', 'mrfr', marks=pytest.mark.slow),
    pytest.param('uniter', 'mrc', marks=pytest.mark.slow),
    pytest.param('uniter', 'mrckl', marks=pytest.mark.slow)])
def test_pretraining_model_losses_and_gradients(design, task):
  """make_inputs -> the design's PRETRAINING (tiny config) -> compute_losses, jitted."""
  from vlpjax.models import get_model  # pylint: disable=import-outside-toplevel
  model_config = _design_config(design)
  model_config.dropout_rate = 0.0
  model_config.attention_dropout_rate = 0.0
  tasks = get_design(design).recipe.components
  config = _config(design, tasks=tasks, ratios=(1,) * len(tasks) if task != 'all' else ())
  config.model = model_config
  model = get_model(model_config)
  batch = _batch(design, dim=model_config.feature_dim,
                 classes=model_config.get('num_region_classes', 11),
                 answers=model_config.get('num_answers', 7))
  if design == 'lxmert':
    batch['object_ids'] %= model_config.num_object_labels
    batch['attr_ids'] %= model_config.num_attr_labels
  words = batch['input_ids'] >= 10
  batch['input_ids'][words] = 10 + batch['input_ids'][words] % (model_config.vocab_size - 10)
  rng = KEY(0)
  kwargs_spec = jax.eval_shape(
      lambda b: pretraining.make_inputs(design, b, rng, task, config)[0], batch)

  @jax.jit
  def losses_and_grads(params, batch):
    kwargs, targets = pretraining.make_inputs(design, batch, rng, task, config)

    def loss_fn(params):
      outputs = model.apply({'params': params}, **kwargs)
      return pretraining.compute_losses(design, outputs, targets, task, config)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (total, losses), grads = losses_and_grads(_random_params(model, kwargs_spec), batch)
  assert set(losses) >= set(tasks if task == 'all' else [task])
  assert np.isfinite(total) and all(np.isfinite(v) for v in losses.values()), losses
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
