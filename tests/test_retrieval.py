"""Image-text retrieval (`vlpjax.tasks.retrieval`): ranks with ties by hand, the
hinge and four-way losses, hard-negative mining, negatives never of the
positive's image, the score head from the matching head, the block scorer's
HLO on 8 devices, the evaluator on two processes, Flickr30k's Karpathy file,
and short fine-tunes on the tiny world whose evaluators score full matrices
that the blocks do not divide."""
import importlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import evaluator_worker
import real_format_fixtures as fx
import task_testing as tt
import vlpjax
from test_finetune import tiny_config
from vlpjax import checkpointing, sharding, state as state_lib, train
from vlpjax.data import annotations_builder as ab
from vlpjax.data import examples as examples_lib
from vlpjax.data import features_builder as fb
from vlpjax.data import formats, input_pipeline, tables
from vlpjax.models import get_design
from vlpjax.tasks import TASKS, get_task, retrieval

pytestmark = pytest.mark.usefixtures('compile_cache')
# The tiny world's train split: 24 images x 3 captions; blocks of 16 images
# (8 devices) and 20 captions divide neither.
IMAGE_BLOCK, CAPTION_BLOCK = 16, 20


# ----------------------------------------------------------------------------
# Ranks and losses by hand.

# Images x captions; captions 0, 1 describe image 0, caption 2 image 1, caption 3 image 2.
SCORES = np.array([[0.9, 0.5, 0.8, 0.1],
                   [0.9, 0.2, 0.7, 0.3],
                   [0.2, 0.5, 0.7, 0.3]], np.float32)
CAPTION_IMAGE = np.array([0, 0, 1, 2])


def test_ranks_count_ties_against_the_query():
  # IR, per caption: the other images scoring >= its image's score.
  #   c0 0.9: image 1 ties (0.9) -> 1; c1 0.5: image 2 ties -> 1;
  #   c2 0.7: image 0 (0.8) and image 2 (0.7, a tie) -> 2; c3 0.3: image 1 ties -> 1.
  np.testing.assert_array_equal(retrieval.image_ranks(SCORES, CAPTION_IMAGE), [1, 1, 2, 1])
  # TR, per image: the captions of other images scoring >= its best caption.
  #   image 0: best 0.9 (c0); c2 0.8, c3 0.1 -> 0 (its own c1 never counts);
  #   image 1: 0.7; c0 0.9 -> 1; image 2: 0.3; c1 0.5, c2 0.7 (c0 0.2 not) -> 2.
  np.testing.assert_array_equal(retrieval.text_ranks(SCORES, CAPTION_IMAGE), [0, 1, 2])
  # Everything tied: no query is first.
  flat = np.ones_like(SCORES)
  np.testing.assert_array_equal(retrieval.image_ranks(flat, CAPTION_IMAGE), [2, 2, 2, 2])
  np.testing.assert_array_equal(retrieval.text_ranks(flat, CAPTION_IMAGE), [2, 3, 3])
  ir = retrieval.recall_counts(retrieval.image_ranks(SCORES, CAPTION_IMAGE))
  tr = retrieval.recall_counts(retrieval.text_ranks(SCORES, CAPTION_IMAGE))
  assert ir == {'r1': 0, 'r5': 4, 'r10': 4, 'count': 4}
  assert tr == {'r1': 1, 'r5': 3, 'r10': 3, 'count': 3}
  metrics = retrieval.summary(ir, tr)
  assert metrics == pytest.approx(dict(ir_r1=0.0, ir_r5=1.0, ir_r10=1.0, tr_r1=1 / 3, tr_r5=1.0,
                                       tr_r10=1.0, r_mean=(2 + 1 / 3 + 2) / 6,
                                       num_captions=4, num_images=3))


def test_ranks_without_ties_are_sorted_positions():
  rng = np.random.default_rng(1)
  caption_image = np.repeat(np.arange(7), 3)
  scores = rng.normal(size=(7, 21))
  ir = retrieval.image_ranks(scores, caption_image)
  tr = retrieval.text_ranks(scores, caption_image)
  for c in range(21):
    order = list(np.argsort(-scores[:, c]))
    assert ir[c] == order.index(caption_image[c])
  for i in range(7):
    order = np.argsort(-scores[i])
    first = min(k for k, c in enumerate(order) if caption_image[c] == i)
    assert tr[i] == first


def test_top_candidates_break_ties_by_index():
  index, values = retrieval.top_candidates(SCORES, 3)
  np.testing.assert_array_equal(index, [[0, 2, 1], [0, 2, 3], [2, 1, 3]])
  np.testing.assert_allclose(values[0], [0.9, 0.8, 0.5])
  index, _ = retrieval.top_candidates(SCORES, 10, axis=0)  # per caption, its images
  np.testing.assert_array_equal(index[0], [0, 1, 2])
  np.testing.assert_array_equal(index[1], [0, 2, 1])


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_hinge_and_four_way_losses():
  scores = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]])
  terms = [max(0, 0.2 + sigmoid(0.0) - sigmoid(2.0)), max(0, 0.2 + sigmoid(1.0) - sigmoid(2.0)),
           max(0, 0.2 + sigmoid(3.0) - sigmoid(0.0)), max(0, 0.2 + sigmoid(-1.0) - sigmoid(0.0))]
  assert terms[0] == terms[3] == 0 and min(terms[1], terms[2]) > 0  # both sides of the hinge
  assert float(retrieval.hinge_loss(scores, 0.2)) == pytest.approx(np.mean(terms), rel=1e-6)
  assert float(retrieval.hinge_loss(jnp.array([[5.0, -5.0]]), 0.2)) == 0.0
  four = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
  expected = np.mean([np.log(np.e + 3) - 1, np.log(3 + np.e**2)])
  assert float(retrieval.four_way_loss(four)) == pytest.approx(expected, rel=1e-6)
  assert float(retrieval.positive_first(four)) == 0.5


# ----------------------------------------------------------------------------
# The model's hard-negative mining, on a backbone whose pooled output is known.


class SumBackbone(nn.Module):
  """pooled [P, 1] = region_feats[:, 0, 0] + input_ids[:, 0]."""

  @nn.compact
  def __call__(self, input_ids, text_mask, region_feats, region_loc, region_mask,
               token_type_ids=None, deterministic=True):
    del text_mask, region_loc, region_mask, token_type_ids, deterministic
    return {'pooled': (region_feats[:, 0, :1] + input_ids[:, :1]).astype(jnp.float32)}


def test_hard_negatives_are_the_top_scoring_candidates():
  model = retrieval.RetrievalModel(
      SumBackbone(), image_negatives=retrieval.Negatives(pool=4, keep=2),
      text_negatives=retrieval.Negatives(random=1, pool=3, keep=1))
  b, t, r = 2, 3, 2
  image_values = np.array([[5, 1, 7, 3], [0, 9, 2, 8]], np.float32)
  text_values = np.array([[4, 1, 6, 2], [3, 0, 1, 5]], np.int32)  # random first, then pool
  batch = dict(input_ids=np.zeros((b, t), np.int32), text_mask=np.ones((b, t), np.int32),
               token_type_ids=np.zeros((b, t), np.int32),
               region_feats=np.zeros((b, r, 1), np.float32),
               region_loc=np.zeros((b, r, 4), np.float32), region_mask=np.ones((b, r), np.int32))
  batch.update(
      neg_input_ids=np.broadcast_to(text_values[..., None], (b, 4, t)).copy(),
      neg_text_mask=np.ones((b, 4, t), np.int32), neg_token_type_ids=np.zeros((b, 4, t), np.int32),
      neg_region_feats=np.broadcast_to(image_values[..., None, None], (b, 4, r, 1)).copy(),
      neg_region_loc=np.zeros((b, 4, r, 4), np.float32),
      neg_region_mask=np.ones((b, 4, r), np.int32))
  params = {'score_head': {'kernel': jnp.ones((1, 1)), 'bias': jnp.zeros((1,))}}
  scores = model.apply({'params': params}, **batch)['scores']
  # [positive, the 2 hardest images, the random caption, the hardest pool caption]
  np.testing.assert_array_equal(scores, [[0, 7, 5, 4, 6], [0, 9, 8, 3, 5]])
  # Gradients reach the trained pairs only: the mining pass has none.
  grads = jax.grad(lambda p: model.apply({'params': p}, **batch)['scores'].sum())(params)
  assert float(grads['score_head']['kernel'][0, 0]) == 0 + 7 + 5 + 4 + 6 + 9 + 8 + 3 + 5
  np.testing.assert_array_equal(retrieval.hardest(jnp.array([[1.0, 3.0, 3.0, 2.0]]), 2),
                                [[1, 2]])
  with pytest.raises(ValueError, match='expects 4 and 4'):
    model.apply({'params': params}, **{k: v[:, :3] if k.startswith('neg_') else v
                                       for k, v in batch.items()})


def test_negative_counts_per_loss():
  config = retrieval.default_retrieval_config()
  one = retrieval.Negatives(random=1)
  assert retrieval.negative_counts(config, 'uniter') == (one, one)
  assert retrieval.negative_counts(config, 'vilbert') == (
      one, retrieval.Negatives(random=1, pool=retrieval.FOUR_WAY_POOL, keep=1))
  config.hard_neg_pool = 399
  hard = retrieval.Negatives(pool=399, keep=31)
  assert retrieval.negative_counts(config, 'lxmert') == (hard, hard)
  config.hard_neg_size = 400
  with pytest.raises(ValueError, match=r'hard_neg_size=400 must be in \[1, hard_neg_pool=399\]'):
    retrieval.negative_counts(config, 'uniter')
  with pytest.raises(ValueError, match='retrieval.loss must be one of'):
    retrieval.resolve_loss('uniter', 'triplet')


# ----------------------------------------------------------------------------
# Data: the tiny world's captions.


def test_negatives_are_other_images_and_deterministic(data_dir):
  config = tiny_config('uniter', data_dir, 'retrieval')
  tokenizer, images, captions, index = retrieval.open_split(config.data, 'uniter', 'train')
  assert (len(captions), len(index.images)) == (72, 24)
  examples = retrieval.RetrievalExamples('uniter', tokenizer, images, captions, index, 6, 5,
                                         seed=3)
  rows = np.arange(72)
  batch = examples.examples(rows, np.zeros(72, np.int64))
  assert batch['neg_region_feats'].shape[:2] == (72, 6)
  assert batch['neg_input_ids'].shape[:2] == (72, 5)
  # Which images: match each negative's features to the split's images.
  all_images = examples_lib.region_batch('uniter', images, index.images)['region_feats']
  flat = batch['neg_region_feats'].reshape((72 * 6, -1))
  found = np.array([np.flatnonzero((all_images.reshape(24, -1) == f).all(1))[0] for f in flat])
  assert not (found.reshape(72, 6) == index.caption_image[rows][:, None]).any()
  assert len(np.unique(found)) > 12  # spread over the split
  positive_text = {tuple(t) for t in batch['input_ids']}
  for row in range(72):
    own = {tuple(batch['input_ids'][c]) for c in np.flatnonzero(
        index.caption_image == index.caption_image[row])}
    assert not own & {tuple(t) for t in batch['neg_input_ids'][row]}
  assert {tuple(t) for t in batch['neg_input_ids'].reshape(-1, batch['input_ids'].shape[1])
          } <= positive_text
  # The same caption in the same epoch draws the same negatives in any batch.
  again = examples.examples(rows[[5, 2]], np.zeros(2, np.int64))
  np.testing.assert_array_equal(again['neg_input_ids'], batch['neg_input_ids'][[5, 2]])
  other_epoch = examples.examples(rows[[5]], np.ones(1, np.int64))
  assert not np.array_equal(other_epoch['neg_region_feats'], batch['neg_region_feats'][[5]])


def test_score_head_from_the_matching_column():
  kernel, bias = np.arange(6.0).reshape(3, 2), np.array([0.5, -0.5])
  head = retrieval.score_head_from_matching(kernel, bias, 1)
  np.testing.assert_array_equal(head['kernel'], [[1.0], [3.0], [5.0]])
  np.testing.assert_array_equal(head['bias'], [-0.5])
  head = retrieval.score_head_from_matching(kernel, bias, get_design('vilbert').matched_label)
  np.testing.assert_array_equal(head['kernel'][:, 0], kernel[:, 0])
  with pytest.raises(ValueError, match=r'kernel \[H, 2\]'):
    retrieval.score_head_from_matching(np.zeros((3, 3)), bias, 1)


def test_config_recipes_and_evaluators():
  assert 'retrieval' in TASKS and get_task('retrieval') is retrieval
  configs = {d: importlib.import_module(f'configs.{d}').get_config('base,task=retrieval')
             for d in ('uniter', 'vilbert', 'lxmert', 'visualbert')}
  uniter = configs['uniter']
  assert (uniter.train.global_batch_size, uniter.train.learning_rate,
          uniter.train.num_steps) == (1280, 5e-5, 20_000)
  assert (uniter.data.max_text_len, uniter.retrieval.margin,
          uniter.retrieval.negative_size) == (60, 0.2, 1)
  vilbert = configs['vilbert']
  assert (vilbert.train.global_batch_size, vilbert.train.learning_rate,
          vilbert.data.max_text_len) == (128, 2e-5, 30)
  assert {d: retrieval.resolve_loss(d, c.retrieval.loss) for d, c in configs.items()} == {
      'uniter': 'hinge', 'vilbert': 'four_way', 'lxmert': 'hinge', 'visualbert': 'hinge'}
  for design in ('lxmert', 'visualbert'):  # no published recipe: UNITER's
    assert (configs[design].train.global_batch_size, configs[design].train.learning_rate,
            configs[design].data.max_text_len) == (1280, 5e-5, 60)
  small = importlib.import_module('configs.lxmert').get_config('small,task=retrieval')
  assert {k: (v.split, v.log_steps) for k, v in small.evals.items()} == {
      'retrieval_val': ('validation', 200), 'retrieval_test': ('test', small.train.num_steps)}
  small.evals = ml_collections.ConfigDict({'x': dict(small.evals.retrieval_val, type='vqa')})
  with pytest.raises(ValueError, match="the retrieval task has evaluators of type 'retrieval'"):
    retrieval.make_evaluators(small, None, None, '')


# ----------------------------------------------------------------------------
# The block scorer on 8 devices: only scores leave the devices.


def test_block_scorer_gathers_no_region_features(data_dir):
  config = tiny_config('uniter', data_dir, 'retrieval')
  config.mesh.shape = (8, 1, 1)
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_axis_rules(config)
  model = retrieval.make_model(config)
  tokenizer, images, captions, index = retrieval.open_split(config.data, 'uniter', 'train')
  regions = examples_lib.region_batch('uniter', images, index.images[:IMAGE_BLOCK])
  image_batch = {k: regions[k] for k in retrieval.IMAGE_KEYS}
  caption_batch = tokenizer.encode(['a red circle'] * 5)
  params = model.init(jax.random.key(0), **{k: v[:1] for k, v in image_batch.items()},
                      **{k: v[:1] for k, v in caption_batch.items()})['params']
  params = jax.device_put(nn.meta.unbox(params), sharding.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    image_sharding = input_pipeline.batch_sharding(mesh, ('data',), IMAGE_BLOCK)
    score = retrieval.block_scorer(model, image_sharding, sharding.replicated(mesh))
    images_on_mesh = {k: jax.device_put(v, image_sharding) for k, v in image_batch.items()}
    captions_on_mesh = retrieval.replicated_batch(sharding.replicated(mesh), caption_batch)
    hlo = score.lower(params, images_on_mesh, captions_on_mesh).compile().as_text()
    out = score(params, images_on_mesh, captions_on_mesh)
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo
  assert out.shape == (IMAGE_BLOCK, 5)
  assert {s.data.shape for s in out.addressable_shards} == {(2, 5)}
  # The blocks score what one pair at a time scores.
  pair = {k: v[3:4] for k, v in image_batch.items()}
  pair['region_feats'] = pair['region_feats'].astype(np.float32)
  one = model.apply({'params': jax.device_get(params)}, **pair,
                    **{k: v[2:3] for k, v in caption_batch.items()})['scores']
  np.testing.assert_allclose(np.asarray(out)[3, 2], one[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Two processes (4 CPU devices each): every image and caption once, the metrics
# and prediction files of the full matrix.


def test_evaluator_on_two_processes(tmp_path):
  base = str(tmp_path / 'ranks')
  results = evaluator_worker.run_two_processes([base], mode='retrieval')
  image_vectors, caption_vectors, caption_image = evaluator_worker.retrieval_matrix()
  scores = image_vectors @ caption_vectors.T
  assert len(np.unique(scores)) < scores.size / 4  # many ties
  expected = retrieval.summary(
      retrieval.recall_counts(retrieval.image_ranks(scores, caption_image)),
      retrieval.recall_counts(retrieval.text_ranks(scores, caption_image)))
  assert expected['num_captions'] == len(caption_image) and expected['num_images'] == 13
  for result in results:
    assert result['metrics'] == pytest.approx(expected)
  # Process p holds image rows [4p, 4p + 4) of each block of 8: 13 images once.
  assert results[0]['positions'] == [0, 1, 2, 3, 8, 9, 10, 11]
  assert results[1]['positions'] == [4, 5, 6, 7, 12]
  ir = json.loads((tmp_path / 'ranks_ir.json').read_text())
  tr = json.loads((tmp_path / 'ranks_tr.json').read_text())
  top_images, _ = retrieval.top_candidates(scores, 10, axis=0)
  assert ir == [{'caption_id': f'c{c}', 'image_ids': [f'i{i}' for i in top_images[c]]}
                for c in range(len(caption_image))]
  top_captions, _ = retrieval.top_candidates(scores, 10)
  assert tr == [{'image_id': f'i{i}', 'caption_ids': [f'c{c}' for c in top_captions[i]]}
                for i in range(13)]
  assert sorted(os.listdir(tmp_path)) == ['ranks_ir.json', 'ranks_tr.json']


# ----------------------------------------------------------------------------
# Flickr30k's Karpathy file (`dataset_flickr30k.json`: no cocoid, file names).

FLICKR_IDS = ['1000092795', '10002456', '1000268201', '1000344755']


def write_flickr_karpathy(path, entries):
  """dataset_flickr30k.json: entries (file stem, split, captions), as Karpathy's."""
  images, sentence_id = [], 0
  for image_index, (stem, split, texts) in enumerate(entries):
    sentences = []
    for text in texts:
      sentences.append(dict(tokens=text.lower().rstrip('.').split(), raw=text,
                            imgid=image_index, sentid=sentence_id))
      sentence_id += 1
    images.append(dict(sentids=[s['sentid'] for s in sentences], imgid=image_index,
                       sentences=sentences, split=split, filename=f'{stem}.jpg'))
  with open(path, 'w') as f:
    json.dump(dict(images=images, dataset='flickr30k'), f)


def test_flickr30k_karpathy_file_builds_with_the_coco_builder(tmp_path):
  fx.write_lxmert_tsv(tmp_path / 'flickr30k_obj36.tsv', fx.random_images(0, FLICKR_IDS))
  fb.main(['lxmert_tsv', '--name', 'flickr', '--data_dir', str(tmp_path / 'data'),
           '--manual_dir', str(tmp_path), '--feature_dim', str(fx.FEATURE_DIM), '--sources',
           'flickr30k_obj36.tsv'])
  write_flickr_karpathy(tmp_path / 'dataset_flickr30k.json', [
      ('1000268201', 'train', ['A child in a pink dress.', 'A girl going into a building.']),
      ('1000092795', 'val', ['Two young guys with shaggy hair.']),
      ('10002456', 'test', ['Several men in hard hats.', 'Workers look down.']),
      ('1000344755', 'train', ['A man on a ladder.'])])
  for name, match in (('flickr30k', []), ('flickr30k_exact', ['--match', 'exact'])):
    ab.main(['coco_captions', '--config', name, '--images', 'lxmert_tsv/flickr', '--data_dir',
             str(tmp_path / 'data'), '--manual_dir', str(tmp_path), '--file',
             'karpathy=dataset_flickr30k.json', *match])
    splits = {split: [tfds.data_source(f'coco_captions/{name}', data_dir=str(tmp_path / 'data'))[
        split][i] for i in range(n)] for split, n in (('train', 3), ('validation', 1),
                                                      ('test', 2))}
    assert [(r['caption_id'], r['text'], r['image_index'], r['image_id'])
            for r in splits['train']] == [
                (0, b'A child in a pink dress.', 2, b'1000268201'),
                (1, b'A girl going into a building.', 2, b'1000268201'),
                (5, b'A man on a ladder.', 3, b'1000344755')]
    assert [r['image_index'] for r in splits['validation']] == [0]
    assert [r['image_id'] for r in splits['test']] == [b'10002456'] * 2
  write_flickr_karpathy(tmp_path / 'missing.json', [('99', 'test', ['Nobody.'])])
  with pytest.raises(formats.FormatError, match=r"missing\.json: image 99\.jpg .*missing image"):
    ab.main(['coco_captions', '--config', 'missing', '--images', 'lxmert_tsv/flickr',
             '--data_dir', str(tmp_path / 'data'), '--manual_dir', str(tmp_path), '--file',
             'karpathy=missing.json'])


# ----------------------------------------------------------------------------
# Fine-tuning end to end on the tiny world (8 CPU devices).


def retrieval_config(design, data_dir, num_steps=2):
  """`configs/<design>.py:tiny,task=retrieval`, evaluated every 2 steps on the
  train split (24 images x 72 captions in blocks of 16 x 20) and validation."""
  config = tiny_config(design, data_dir, 'retrieval')
  config.train.num_steps = num_steps
  config.checkpoint.every_steps = num_steps
  config.retrieval.hard_neg_pool = 3  # 'four_way': its pool; 'hinge': 3 candidates, top 2
  config.retrieval.hard_neg_size = 2
  config.evals = ml_collections.ConfigDict(dict(
      retrieval_train=dict(type='retrieval', split='train', batch_size=IMAGE_BLOCK,
                           caption_block=CAPTION_BLOCK, log_steps=2),
      retrieval_val=dict(type='retrieval', split='validation', batch_size=8, log_steps=2)))
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def index_images(config):
  """The images table rows of the train split's images, in the evaluator's order."""
  return retrieval.open_split(config.data, config.model.name, 'train')[3].images


def full_matrix(config, params):
  """The train split's scores [24, 72], every pair in one call on one device."""
  model = retrieval.make_model(config)
  tokenizer, images, captions, index = retrieval.open_split(config.data, config.model.name,
                                                            'train')
  regions = examples_lib.region_batch(config.model.name, images, index.images)
  texts = tokenizer.encode([tables.as_text(r['text']) for r in captions.read(range(72))])
  pairs = {k: np.repeat(regions[k], 72, axis=0) for k in retrieval.IMAGE_KEYS}
  pairs.update({k: np.tile(v, (24,) + (1,) * (v.ndim - 1)) for k, v in texts.items()})
  pairs['region_feats'] = pairs['region_feats'].astype(np.float32)
  scores = jax.jit(lambda p, b: model.apply({'params': p}, **b)['scores'])(params, pairs)
  return np.asarray(scores).reshape(24, 72), index.caption_image, captions


def test_uniter_finetunes_from_pretraining_and_scores_every_pair_once(data_dir, tmp_path):
  pretrained = str(tmp_path / 'pretrain')
  config = tiny_config('uniter', data_dir)
  config.train.num_steps = 1
  train.train_and_evaluate(config, pretrained)
  workdir = str(tmp_path / 'retrieval')
  config = retrieval_config('uniter', data_dir)
  config.init.source = f'workdir:{pretrained}'
  # The score head starts from the ITM head's matched column.
  model = retrieval.make_model(config)
  mesh = sharding.make_mesh(config)
  specs = train.step_lib.model_input_specs(
      config, retrieval, 'retrieval',
      train.peek_batch_spec(retrieval.make_train_iterator(config, None)))
  abstract, shardings = state_lib.abstract_train_state(
      model, optax.sgd(0.1), specs, mesh, sharding.logical_axis_rules(config))
  fresh = state_lib.init_train_state(model, optax.sgd(0.1), specs, 0, shardings).params
  started = retrieval.init_heads(config, fresh, abstract.params)
  itm, _ = checkpointing.restore_workdir_params(pretrained, subtree='itm')
  np.testing.assert_array_equal(started['score_head']['kernel'], itm['kernel'][:, 1:])
  np.testing.assert_array_equal(started['score_head']['bias'], itm['bias'][1:])
  config.retrieval.head_from_pretraining = False
  assert retrieval.init_heads(config, fresh, abstract.params) == dict(fresh)
  config.retrieval.head_from_pretraining = True

  final = train.train_and_evaluate(config, workdir)
  assert np.isfinite(final['hinge'])
  records = read_metrics(workdir)
  logged = [r for r in records if 'retrieval_train/r_mean' in r]
  assert [r['step'] for r in logged] == [1, 2]
  assert all((r['retrieval_train/num_images'], r['retrieval_train/num_captions']) == (24, 72)
             for r in logged)
  assert [(r['retrieval_val/num_images'], r['retrieval_val/num_captions']) for r in records
          if 'retrieval_val/r_mean' in r] == [(4, 12), (4, 12)]
  # The blocked, sharded evaluation equals the whole matrix scored at once.
  params, step = checkpointing.restore_workdir_params(workdir)
  assert step == 2
  scores, caption_image, captions = full_matrix(config, params)
  expected = retrieval.summary(
      retrieval.recall_counts(retrieval.image_ranks(scores, caption_image)),
      retrieval.recall_counts(retrieval.text_ranks(scores, caption_image)))
  assert {k: logged[-1][f'retrieval_train/{k}'] for k in expected} == pytest.approx(expected)
  with open(os.path.join(workdir, 'predictions', 'retrieval_train_step2_ir.json')) as f:
    ir = json.load(f)
  with open(os.path.join(workdir, 'predictions', 'retrieval_train_step2_tr.json')) as f:
    tr = json.load(f)
  caption_ids = [int(r['caption_id']) for r in captions.read(range(72))]
  assert [r['caption_id'] for r in ir] == caption_ids
  assert len(tr) == 24 and all(len(r['caption_ids']) == 10 for r in tr)
  top = retrieval.top_candidates(scores, 10)[0]
  assert [r['caption_ids'] for r in tr] == [[caption_ids[c] for c in row] for row in top]
  assert not [f for f in os.listdir(os.path.join(workdir, 'predictions')) if '.part-' in f]
  # `vlpjax.load` scores your own captions and images as the evaluator does.
  model = vlpjax.load(workdir)
  assert model.step == 2
  rows = tfds.data_source('vlp_world/tiny_images', data_dir=data_dir)['train']
  images = [tt.image_inputs(rows[int(i)]) for i in index_images(config)[:3]]
  texts = [tables.as_text(r['text']) for r in captions.read(range(5))]
  mine = model.scores(texts, images)  # 15 pairs: batches of 64 wrap around
  np.testing.assert_allclose(mine, scores[:3, :5].T, atol=1e-5)
  assert model.rank_images(texts[0], images, k=2) == list(np.argsort(-scores[:3, 0])[:2])
  assert model.rank_captions(images[1], texts, k=5) == list(np.argsort(-scores[1, :5]))


@pytest.mark.slow
@pytest.mark.parametrize('design', ['vilbert', 'lxmert', 'visualbert'])
def test_other_designs_finetune(design, data_dir, tmp_path):
  config = retrieval_config(design, data_dir)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final[retrieval.resolve_loss(design)])
  records = read_metrics(str(tmp_path))
  assert [(r['retrieval_train/num_images'], r['retrieval_train/num_captions'])
          for r in records if 'retrieval_train/r_mean' in r] == [(24, 72)] * 2
