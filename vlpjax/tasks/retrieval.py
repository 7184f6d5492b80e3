"""Image-text retrieval (Flickr30k, COCO; Karpathy splits): ranking head, losses,
the full caption x image evaluation and its prediction files.

Shared TASKS.md "Image-text retrieval". The captions table is the data: its
splits are disjoint by image (Karpathy's; the embedded world's likewise), and
every caption describes one image (`image_index`).

Model (`RetrievalModel`): the design's backbone (as `vqa.make_model` builds it)
and a score head Linear(H, 1) on `pooled` (ViLBERT's pooled is already the
product of its two streams'). With `init.source='workdir:DIR'` of a run that has
the design's 2-way matching head (`Design.matching_head`), the score head starts
from that head's matched column (`Design.matched_label`), as UNITER's
`init_output` copies its ITM head's positive row (`init_heads`).

Losses (`LOSSES` gives each design's default; `retrieval.loss` overrides it):
  'hinge'     UNITER's `train_itm`: for each positive pair, `negative_size`
              pairs with the caption's image replaced and as many with the
              image's caption replaced; mean(max(0, margin + s(neg) - s(pos)))
              over them with s = sigmoid(score), as UNITER's `rank_loss`
              (margin 0.2). With `hard_neg_pool` > 0 it is UNITER's
              `train_itm_hard_negatives`: `hard_neg_pool` (399) candidates per
              side are scored by the model in deterministic mode without
              gradients, and the loss trains on the top `hard_neg_size` (31).
              LXMERT and VisualBERT use it too: TASKS.md names no retrieval
              recipe for them.
  'four_way'  ViLBERT (vilbert-multi-task's RetreivalDataset): cross-entropy
              over (the pair, the image with a random caption, a random image
              with the caption, the image with a hard caption), target 0. The
              original picks the hard caption from an offline pool of similar
              images (`hard_negative.pkl`, built once before training); a
              jitted step has no such pool, so here `hard_neg_pool` random
              captions of other images are scored by the current model
              (deterministic, no gradients) and the best-scoring one is the
              hard negative.
Negatives are drawn per example as a hash of (seed, epoch, caption index,
stream, slot) (`vlpjax.data.examples.hashed_uniform`): an image uniformly among
the split's other images (never the positive's), a caption uniformly among the
captions of such an image. Hard-negative mining is part of the model's call
(`RetrievalModel`: a stop-gradient scoring pass over the pool, `top_k`, a
gather), so every shape stays static.

Batches (`RetrievalExamples`): input_ids, text_mask, token_type_ids int32
[B, T] and region_feats [B, R, F], region_loc [B, R, L], region_mask [B, R] of
the positive pairs; `neg_region_*` [B, Ni, R, ...] (images of other images,
paired with the caption) and `neg_input_ids`, `neg_text_mask`,
`neg_token_type_ids` [B, Nt, T] (captions of other images, paired with the
image), Ni and Nt from `negative_counts`.

Evaluation (`RetrievalEvaluator`, type 'retrieval') scores every caption with
every image of a split through the cross-encoder, in blocks of [Bi images] x
[Bc captions]: the images are sharded over the mesh's data axes, the caption
block is replicated, the pairs are formed on the device (each device scores its
images' pairs) and only the scores [Bi, Bc] leave the devices (`block_scorer`).
Each process keeps the score rows of its images; the metrics need only
per-caption vectors from the other processes. Padded rows (images) and columns
(captions) of partial blocks are never scored into the metrics.

Ranks, ties included (`image_ranks`, `text_ranks`): the rank of a query is the
number of non-matching candidates that score >= its best matching candidate
(0 = first): the pessimistic rule, so a model that gives every pair the same
score gets no hits. IR (image retrieval): per caption, among all images; TR
(text retrieval): per image, among all captions, its best caption counting.
R@K is the fraction of queries with rank < K; `r_mean` the mean of the six
(UNITER's). Values are fractions (UNITER's papers print percentages).

Prediction files: `predictions/<name>_step<N>_ir.json` ([{"caption_id",
"image_ids": top 10}], per caption, split order) and `..._tr.json`
([{"image_id", "caption_ids": top 10}], per image), merged by process 0.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlpjax import paths
from vlpjax.data import examples as examples_lib
from vlpjax.data import input_pipeline, tables
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.models import DESIGNS, get_design, get_model
from vlpjax.models import layers
from vlpjax.objectives.common import mean
from vlpjax.tasks import vqa

EVAL_TYPE = 'retrieval'
# The metric of the `retrieval_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'r_mean'
LOSS_KINDS = ('hinge', 'four_way')
# Each design's original loss (TASKS.md); LXMERT and VisualBERT: UNITER's.
LOSSES = {'uniter': 'hinge', 'vilbert': 'four_way', 'lxmert': 'hinge', 'visualbert': 'hinge'}
SCORE_HEAD = 'score_head'
BACKBONE = vqa.BACKBONE
TEXT_KEYS = ('input_ids', 'text_mask', 'token_type_ids')
IMAGE_KEYS = vqa.REGION_KEYS  # region_feats, region_loc, region_mask
NEGATIVE_PREFIX = 'neg_'
# Candidates of the four-way loss's hard caption. ViLBERT's offline pool
# (`train_hard_pool` in hard_negative.pkl) has no size the repository states.
FOUR_WAY_POOL = 7
# Streams of `hashed_uniform` (independent choices per example).
_NEG_IMAGE, _NEG_CAPTION_IMAGE, _NEG_CAPTION = 0, 1, 2
# Top candidates kept per query in the prediction files.
TOP_K = 10
RECALLS = (1, 5, 10)


def default_retrieval_config() -> ml_collections.ConfigDict:
  """The `config.retrieval` section (None: the design's / the loss's default)."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      train_split='train',
      loss=placeholder(str),   # LOSS_KINDS; None: LOSSES[design]
      margin=0.2,              # 'hinge': UNITER's margin, on sigmoid scores
      negative_size=1,         # random negatives per side ('hinge'; 'four_way' uses 1)
      # Candidates scored for hard negatives per side; 0: none. None: 0 for
      # 'hinge', FOUR_WAY_POOL captions for 'four_way'.
      hard_neg_pool=placeholder(int),
      hard_neg_size=31,        # 'hinge' with a pool: the top candidates trained on
      # Start the score head from the init.source run's matching head.
      head_from_pretraining=True,
  ))


def resolve_loss(design: str, loss: str | None = None) -> str:
  """`loss`, or the design's default (LOSSES); errors name the valid choices."""
  if design not in LOSSES:
    raise ValueError(f'unknown design {design!r}; expected one of {tuple(LOSSES)}')
  return vqa.choose('retrieval.loss', LOSSES[design] if loss is None else loss, LOSS_KINDS)


@dataclasses.dataclass(frozen=True)
class Negatives:
  """Negatives of one side of a positive pair.

  Attributes:
    random: kept as drawn.
    pool: hard-negative candidates, scored without gradients.
    keep: the top-scoring candidates of the pool trained on.
  """
  random: int = 0
  pool: int = 0
  keep: int = 0

  @property
  def drawn(self) -> int:
    """Negatives in the batch: random + pool."""
    return self.random + self.pool

  @property
  def scored(self) -> int:
    """Negatives in the loss: random + keep."""
    return self.random + (self.keep if self.pool else 0)


def negative_counts(retrieval: ml_collections.ConfigDict, design: str
                    ) -> tuple[Negatives, Negatives]:
  """(the caption's image replaced, the image's caption replaced) of `config.retrieval`."""
  loss = resolve_loss(design, retrieval.loss)
  pool = retrieval.hard_neg_pool
  if loss == 'four_way':
    pool = FOUR_WAY_POOL if pool is None else pool
    if pool < 1:
      raise ValueError(f"retrieval.hard_neg_pool must be >= 1 for 'four_way', got {pool}")
    return Negatives(random=1), Negatives(random=1, pool=pool, keep=1)
  pool = pool or 0
  if pool:
    if not 0 < retrieval.hard_neg_size <= pool:
      raise ValueError(f'retrieval.hard_neg_size={retrieval.hard_neg_size} must be in '
                       f'[1, hard_neg_pool={pool}]')
    side = Negatives(pool=pool, keep=retrieval.hard_neg_size)
  else:
    if retrieval.negative_size < 1:
      raise ValueError(f'retrieval.negative_size must be >= 1, got {retrieval.negative_size}')
    side = Negatives(random=retrieval.negative_size)
  return side, side


# ----------------------------------------------------------------------------
# The model.


def hardest(scores: jax.Array, keep: int) -> jax.Array:
  """Indices of the `keep` highest scores per row: scores [B, N] -> int32 [B, keep]
  (ties: the lower index first, `lax.top_k`)."""
  return jax.lax.top_k(scores, keep)[1]


def _flatten_pairs(tree: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """[B, N, ...] -> [B * N, ...]."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in tree.items()}


def _repeat(tree: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, ...] -> [B, n, ...] (each row n times)."""
  return {k: jnp.broadcast_to(v[:, None], (v.shape[0], n) + v.shape[1:])
          for k, v in tree.items()}


def _take(tree: Mapping[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
  """[B, N, ...] at index [B, K] -> [B, K, ...]."""
  def take(v):
    shaped = index.reshape(index.shape + (1,) * (v.ndim - 2))
    return jnp.take_along_axis(v, shaped, axis=1)
  return {k: take(v) for k, v in tree.items()}


class RetrievalModel(nn.Module):
  """A design's backbone and a score head Linear(H, 1) on `pooled`.

  Params: {'backbone': <the backbone's params>, 'score_head': {kernel [H, 1], bias [1]}}.

  Attributes:
    backbone: `vlpjax.models.get_model(config.model, pretraining=False)`.
    image_negatives, text_negatives: the negatives of the two sides (training
      batches carry `drawn` of each; see `negative_counts`).
    dtype, param_dtype: of the head.
  """
  backbone: nn.Module
  image_negatives: Negatives = Negatives()
  text_negatives: Negatives = Negatives()
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def setup(self):
    self.score_head = layers.Dense(1, ('embed', None), dtype=jnp.dtype(self.dtype),
                                   param_dtype=jnp.dtype(self.param_dtype))

  def score(self, text: Mapping[str, jax.Array], image: Mapping[str, jax.Array],
            deterministic: bool) -> jax.Array:
    """Scores of pairs: text TEXT_KEYS [P, T], image IMAGE_KEYS [P, R, ...] -> float32 [P]."""
    outputs = self.backbone(text['input_ids'], text['text_mask'], image['region_feats'],
                            image['region_loc'], image['region_mask'],
                            token_type_ids=text['token_type_ids'],
                            deterministic=deterministic)
    return self.score_head(outputs['pooled'])[:, 0].astype(jnp.float32)

  def _side(self, side: Negatives, text: Mapping[str, jax.Array],
            image: Mapping[str, jax.Array]) -> tuple[dict, dict]:
    """The scored negatives of one side: text, image [B, drawn, ...] ->
    [B, scored, ...] each (the pool mined for its hardest, no gradients)."""
    def split(tree):
      return ({k: v[:, :side.random] for k, v in tree.items()},
              {k: v[:, side.random:] for k, v in tree.items()})
    (random_text, pool_text), (random_image, pool_image) = split(text), split(image)
    if not side.pool:
      return random_text, random_image
    b = pool_text['input_ids'].shape[0]
    pool_scores = jax.lax.stop_gradient(self.score(
        _flatten_pairs(pool_text), _flatten_pairs(pool_image), True).reshape(b, side.pool))
    index = hardest(pool_scores, side.keep)
    hard_text, hard_image = _take(pool_text, index), _take(pool_image, index)
    return ({k: jnp.concatenate([random_text[k], hard_text[k]], 1) for k in text},
            {k: jnp.concatenate([random_image[k], hard_image[k]], 1) for k in image})

  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, token_type_ids: jax.Array,
               region_feats: jax.Array, region_loc: jax.Array, region_mask: jax.Array,
               deterministic: bool = True, **negatives: jax.Array) -> dict[str, jax.Array]:
    """Scores the pairs, or each positive pair with its negatives.

    Args:
      input_ids, text_mask, token_type_ids: [B, T].
      region_feats [B, R, F], region_loc [B, R, L], region_mask [B, R].
      deterministic: no dropout when True (the mining pass always is).
      **negatives: none (evaluation), or `neg_region_*` [B, Ni, R, ...] and
        `neg_input_ids`, `neg_text_mask`, `neg_token_type_ids` [B, Nt, T]
        with Ni, Nt the `drawn` counts of the two sides.

    Returns:
      {'scores': float32 [B]} without negatives; else [B, 1 + Ki + Kt]:
      column 0 the positive pair, then the caption with Ki other images, then
      the image with Kt other captions (K: the `scored` counts).
    """
    text = dict(input_ids=input_ids, text_mask=text_mask, token_type_ids=token_type_ids)
    image = dict(region_feats=region_feats, region_loc=region_loc, region_mask=region_mask)
    if not negatives:
      return {'scores': self.score(text, image, deterministic)}
    expected = {NEGATIVE_PREFIX + k for k in TEXT_KEYS + IMAGE_KEYS}
    if set(negatives) != expected:
      raise ValueError(f'RetrievalModel takes negatives {sorted(expected)}, got '
                       f'{sorted(negatives)}')
    neg_image = {k: negatives[NEGATIVE_PREFIX + k] for k in IMAGE_KEYS}
    neg_text = {k: negatives[NEGATIVE_PREFIX + k] for k in TEXT_KEYS}
    ni, nt = neg_image['region_feats'].shape[1], neg_text['input_ids'].shape[1]
    if (ni, nt) != (self.image_negatives.drawn, self.text_negatives.drawn):
      raise ValueError(f'the batch has {ni} image and {nt} caption negatives per pair; the '
                       f'model expects {self.image_negatives.drawn} and '
                       f'{self.text_negatives.drawn}')
    image_side = self._side(self.image_negatives, _repeat(text, ni), neg_image)
    text_side = self._side(self.text_negatives, neg_text, _repeat(image, nt))
    pairs_text = {k: jnp.concatenate([text[k][:, None], image_side[0][k], text_side[0][k]], 1)
                  for k in TEXT_KEYS}
    pairs_image = {k: jnp.concatenate([image[k][:, None], image_side[1][k],
                                       text_side[1][k]], 1) for k in IMAGE_KEYS}
    b, n = input_ids.shape[0], pairs_text['input_ids'].shape[1]
    scores = self.score(_flatten_pairs(pairs_text), _flatten_pairs(pairs_image), deterministic)
    return {'scores': layers.constrain(scores.reshape(b, n), ('batch', None))}


def build_model(config: ml_collections.ConfigDict) -> RetrievalModel:
  """The RetrievalModel of `config.model` with the negatives of `config.retrieval`."""
  image_side, text_side = negative_counts(config.retrieval, config.model.name)
  return RetrievalModel(backbone=get_model(config.model, pretraining=False),
                        image_negatives=image_side, text_negatives=text_side,
                        dtype=config.model.dtype, param_dtype=config.model.param_dtype)


def score_head_from_matching(kernel: np.ndarray, bias: np.ndarray, matched_label: int
                             ) -> dict[str, np.ndarray]:
  """A 2-way matching head (kernel [H, 2], bias [2]) -> the score head (kernel
  [H, 1], bias [1]) of its `matched_label` column, as UNITER's `init_output`."""
  kernel, bias = np.asarray(kernel), np.asarray(bias)
  if kernel.ndim != 2 or kernel.shape[1] != 2 or bias.shape != (2,):
    raise ValueError(f'a matching head has kernel [H, 2] and bias [2], got {kernel.shape} '
                     f'and {bias.shape}')
  return {'kernel': kernel[:, matched_label:matched_label + 1],
          'bias': bias[matched_label:matched_label + 1]}


# ----------------------------------------------------------------------------
# Losses: scores [B, 1 + K], column 0 the positive pair.


def hinge_loss(scores: jax.Array, margin: float) -> jax.Array:
  """UNITER's rank loss: mean over the negatives of max(0, margin + sigmoid(neg) -
  sigmoid(pos)) -> scalar."""
  probs = jax.nn.sigmoid(scores.astype(jnp.float32))
  return mean(jnp.maximum(0.0, margin + probs[:, 1:] - probs[:, :1]))


def four_way_loss(scores: jax.Array) -> jax.Array:
  """ViLBERT's: cross-entropy of softmax(scores) with target 0, mean over pairs -> scalar."""
  return -mean(jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)[:, 0])


def positive_first(scores: jax.Array) -> jax.Array:
  """Fraction of rows whose positive scores above every negative -> scalar."""
  return mean((scores[:, 0] > jnp.max(scores[:, 1:], axis=-1)).astype(jnp.float32))


# ----------------------------------------------------------------------------
# Examples.


@dataclasses.dataclass(frozen=True)
class CaptionIndex:
  """A split's captions grouped by image.

  images: the split's image rows (into the images table), sorted [I];
  caption_image: each caption's position in `images` [C]; order / start: the
  captions sorted by image, image j's being order[start[j]:start[j + 1]].
  """
  images: np.ndarray
  caption_image: np.ndarray
  order: np.ndarray
  start: np.ndarray

  @classmethod
  def from_image_index(cls, image_index: np.ndarray) -> CaptionIndex:
    images, caption_image = np.unique(np.asarray(image_index, np.int64), return_inverse=True)
    order = np.argsort(caption_image, kind='stable')
    start = np.searchsorted(caption_image[order], np.arange(len(images) + 1))
    return cls(images=images, caption_image=caption_image.astype(np.int64), order=order,
               start=start)

  def other_images(self, image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Positions (in `images`) uniform among those other than `image` (broadcast with u)."""
    n = len(self.images)
    if n < 2:
      raise ValueError(f'{n} image(s) in the split: negatives need another image')
    pick = np.minimum((u * (n - 1)).astype(np.int64), n - 2)
    return pick + (pick >= image)

  def caption_of(self, image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A caption (index in the split) uniform among image positions' captions."""
    count = self.start[image + 1] - self.start[image]
    return self.order[self.start[image] + np.minimum((u * count).astype(np.int64), count - 1)]


@dataclasses.dataclass
class RetrievalExamples:
  """Training batches of positive pairs and their negatives (module docstring).

  Attributes:
    design: the model's design name.
    tokenizer: BertTokenizer (T = max_len).
    images: the images table.
    captions: the captions table's split ('text', 'image_index').
    index: its CaptionIndex.
    image_negatives, text_negatives: `drawn` negatives per side.
    seed: the data seed.
  """
  design: str
  tokenizer: BertTokenizer
  images: tables.ImageTable
  captions: tables.Table
  index: CaptionIndex
  image_negatives: int
  text_negatives: int
  seed: int

  def __len__(self) -> int:
    return len(self.captions)

  def _texts(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self.captions.read(indices.reshape(-1))
    return self.tokenizer.encode([tables.as_text(r['text']) for r in records])

  def _regions(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    regions = examples_lib.region_batch(self.design, self.images,
                                        self.index.images[positions.reshape(-1)])
    return {k: regions[k] for k in IMAGE_KEYS}

  def examples(self, captions: np.ndarray, epoch: np.ndarray) -> dict[str, np.ndarray]:
    """The batch of captions [B] (split indices) drawn as in `epoch` [B]."""
    captions = np.asarray(captions, np.int64).reshape(-1)
    b = len(captions)
    image = self.index.caption_image[captions]
    batch = self._texts(captions)
    batch.update(self._regions(image))
    keys = (self.seed, epoch[:, None], captions[:, None])
    slot_i, slot_t = np.arange(self.image_negatives), np.arange(self.text_negatives)
    neg_image = self.index.other_images(
        image[:, None], examples_lib.hashed_uniform(*keys, _NEG_IMAGE, slot_i[None]))
    caption_image = self.index.other_images(
        image[:, None], examples_lib.hashed_uniform(*keys, _NEG_CAPTION_IMAGE, slot_t[None]))
    neg_caption = self.index.caption_of(
        caption_image, examples_lib.hashed_uniform(*keys, _NEG_CAPTION, slot_t[None]))
    for key, value in self._regions(neg_image).items():
      batch[NEGATIVE_PREFIX + key] = value.reshape((b, self.image_negatives) + value.shape[1:])
    for key, value in self._texts(neg_caption).items():
      batch[NEGATIVE_PREFIX + key] = value.reshape((b, self.text_negatives) + value.shape[1:])
    return batch

  def examples_fn(self, epochs: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """`endless_batches`' function: captions `indices` [B] drawn as in `epochs` [B]."""
    return self.examples(np.asarray(indices, np.int64), np.asarray(epochs, np.int64))


def open_split(data_config: ml_collections.ConfigDict, design: str, split: str
               ) -> tuple[BertTokenizer, tables.ImageTable, tables.Table, CaptionIndex]:
  """(tokenizer, images table, the captions split, its CaptionIndex) for `design`."""
  if design not in DESIGNS:
    raise ValueError(f'design must be one of {DESIGNS}, got {design!r}')
  tokenizer = BertTokenizer(tables.vocab_file(data_config), data_config.max_text_len,
                            lowercase=data_config.lowercase)
  images = tables.open_image_table(data_config)
  captions = tables.Table(tables.open_table(data_config, 'captions', split),
                          ('caption_id', 'text', 'image_index', 'image_id'),
                          name=tables.table_name(data_config, 'captions'))
  tables.check_same_images(data_config, 'captions', split)
  index = CaptionIndex.from_image_index(tables.read_image_indices(captions))
  return tokenizer, images, captions, index


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh | None
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, shuffled, resumable batches of `retrieval.train_split`'s captions
  with their negatives (`RetrievalExamples`)."""
  global_batch_size = config.train.global_batch_size
  rows, seed, sharding = input_pipeline.batch_layout(
      config.data, global_batch_size, config.seed, mesh, tuple(config.mesh.data_axes))
  split = config.retrieval.train_split
  tokenizer, images, captions, index = open_split(config.data, config.model.name, split)
  image_side, text_side = negative_counts(config.retrieval, config.model.name)
  examples = RetrievalExamples(config.model.name, tokenizer, images, captions, index,
                               image_side.drawn, text_side.drawn, seed)
  stream = input_pipeline.endless_batches(config.data, len(captions), global_batch_size, rows,
                                          seed, examples.examples_fn)
  fingerprint = dict(
      task='retrieval', design=config.model.name, seed=seed,
      global_batch_size=global_batch_size,
      split=split, num_captions=len(captions), num_images=len(index.images),
      tables=[tables.table_name(config.data, t) for t in ('images', 'captions')],
      negatives=[dataclasses.astuple(image_side), dataclasses.astuple(text_side)],
      max_text_len=config.data.max_text_len, max_regions=config.data.max_regions,
      worker_count=config.data.worker_count)
  return input_pipeline.PretrainingIterator(iter(stream), fingerprint, sharding)


# ----------------------------------------------------------------------------
# Ranks and recalls (pure; numpy).


def true_scores(scores: np.ndarray, image_positions: np.ndarray, caption_image: np.ndarray
                ) -> np.ndarray:
  """Each caption's score with its own image where that image is a row here, else 0:
  scores [Li, C] of the images at `image_positions` [Li] -> float32 [C]. Summed
  over processes (one of which holds each caption's image) it is every
  caption's true score."""
  row = {int(p): i for i, p in enumerate(image_positions)}
  out = np.zeros(len(caption_image), np.float32)
  for c, image in enumerate(caption_image):
    if int(image) in row:
      out[c] = scores[row[int(image)], c]
  return out


def image_rank_counts(scores: np.ndarray, image_positions: np.ndarray,
                      caption_image: np.ndarray, caption_true_scores: np.ndarray
                      ) -> np.ndarray:
  """Per caption, how many of these rows' images (not its own) score >= its true
  score: int64 [C]; summed over processes, the IR rank (`image_ranks`)."""
  at_least = scores >= caption_true_scores[None, :]
  own = image_positions[:, None] == caption_image[None, :]
  return np.sum(at_least & ~own, axis=0, dtype=np.int64)


def text_ranks_of_rows(scores: np.ndarray, image_positions: np.ndarray,
                       caption_image: np.ndarray) -> np.ndarray:
  """Per row's image, how many captions not of it score >= its best caption: int64 [Li]."""
  own = image_positions[:, None] == caption_image[None, :]
  if not own.any(axis=1).all():
    missing = image_positions[~own.any(axis=1)]
    raise ValueError(f'images at positions {missing.tolist()} have no caption')
  best = np.max(np.where(own, scores, -np.inf), axis=1)
  return np.sum((scores >= best[:, None]) & ~own, axis=1, dtype=np.int64)


def image_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
  """IR ranks of a full matrix: scores [I, C] (image x caption), caption_image
  [C] -> int64 [C] (0 = the caption's image first; ties count against it)."""
  positions = np.arange(scores.shape[0])
  return image_rank_counts(scores, positions, caption_image,
                           true_scores(scores, positions, caption_image))


def text_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
  """TR ranks of a full matrix: scores [I, C] -> int64 [I]."""
  return text_ranks_of_rows(scores, np.arange(scores.shape[0]), caption_image)


def recall_counts(ranks: np.ndarray) -> dict[str, np.int64]:
  """{'r1', 'r5', 'r10': queries with rank < K, 'count'}, int64 (summable)."""
  ranks = np.asarray(ranks)
  return {**{f'r{k}': np.int64(np.sum(ranks < k)) for k in RECALLS},
          'count': np.int64(ranks.size)}


def summary(ir: Mapping[str, Any], tr: Mapping[str, Any]) -> dict[str, float]:
  """IR/TR R@1/5/10 (fractions), their mean `r_mean`, and the query counts."""
  out = {}
  for name, counts in (('ir', ir), ('tr', tr)):
    n = int(counts['count'])
    for k in RECALLS:
      out[f'{name}_r{k}'] = int(counts[f'r{k}']) / n if n else float('nan')
  out['r_mean'] = float(np.mean([out[f'{n}_r{k}'] for n in ('ir', 'tr') for k in RECALLS]))
  out['num_captions'], out['num_images'] = int(ir['count']), int(tr['count'])
  return out


def top_candidates(scores: np.ndarray, k: int = TOP_K, axis: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The `k` best candidates along `axis` (score descending, then index
  ascending): (indices int64, their scores), [N, k'] with k' = min(k, size)."""
  s = scores if axis == 1 else scores.T
  k = min(k, s.shape[1])
  order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :k]
  return order.astype(np.int64), np.take_along_axis(s, order, axis=1)


# ----------------------------------------------------------------------------
# Block scoring (on the mesh).


def block_scorer(model: RetrievalModel, image_sharding: NamedSharding,
                 caption_sharding: NamedSharding
                 ) -> Callable[[Any, Mapping[str, jax.Array], Mapping[str, jax.Array]],
                               jax.Array]:
  """The evaluators' jitted block step: (params, images IMAGE_KEYS [Bi, R, ...]
  sharded over the data axes, captions TEXT_KEYS [Bc, T] replicated) -> scores
  float32 [Bi, Bc], rows sharded as the images. The pairs [Bi * Bc] are made on
  the device, image-major, so each device scores its own images' pairs."""
  mesh, axes = image_sharding.mesh, image_sharding.spec[0]
  pair_sharding = NamedSharding(mesh, PartitionSpec(axes))
  out_sharding = NamedSharding(mesh, PartitionSpec(axes, None))

  def score(params, images, captions):
    bi, bc = images['region_feats'].shape[0], captions['input_ids'].shape[0]
    images = dict(images, region_feats=images['region_feats'].astype(jnp.float32))
    pairs = {}
    for k, v in images.items():
      v = jnp.broadcast_to(v[:, None], (bi, bc) + v.shape[1:])
      pairs[k] = jax.lax.with_sharding_constraint(v.reshape((bi * bc,) + v.shape[2:]),
                                                  pair_sharding)
    for k, v in captions.items():
      v = jnp.broadcast_to(v[None], (bi,) + v.shape)
      pairs[k] = jax.lax.with_sharding_constraint(v.reshape((bi * bc,) + v.shape[2:]),
                                                  pair_sharding)
    scores = model.apply({'params': params}, **pairs, deterministic=True)['scores']
    return scores.reshape(bi, bc)

  return jax.jit(score, in_shardings=(None, image_sharding, caption_sharding),
                 out_shardings=out_sharding)


def replicated_batch(sharding: NamedSharding, batch: Mapping[str, np.ndarray]
                     ) -> dict[str, jax.Array]:
  """A host batch that every process holds whole -> global arrays, replicated."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), np.shape(v))
          for k, v in batch.items()}


def score_rows(score_block: Callable[[Any, Any, Any], jax.Array], params: Any,
               num_images: int, image_batch: Callable[[np.ndarray], dict[str, np.ndarray]],
               num_captions: int, caption_batch: Callable[[np.ndarray], dict[str, np.ndarray]],
               image_block: int, caption_block: int, image_sharding: NamedSharding,
               caption_sharding: NamedSharding, name: str = EVAL_TYPE,
               log_every_seconds: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
  """Scores every image with every caption, in blocks; this process keeps its rows.

  Images [0, num_images) go in `evaluators.common.eval_batches` of
  `image_block` (the last padded and masked), each process building its rows
  with `image_batch(positions)`; captions in blocks of `caption_block`, every
  process building each whole with `caption_batch(indices)` (the last block
  padded with caption 0, its padding columns dropped). Progress and an ETA
  are logged every `log_every_seconds`.

  Returns:
    (this process's image positions int64 [Li], their scores float32 [Li, C]).
  """
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  caption_starts = range(0, num_captions, caption_block)
  caption_blocks = []
  for start in caption_starts:
    indices = np.arange(start, start + caption_block)
    real = indices < num_captions
    caption_blocks.append((replicated_batch(caption_sharding,
                                            caption_batch(np.where(real, indices, 0))), real))
  total = common.num_batches(num_images, image_block) * len(caption_blocks)
  positions, rows = [], []
  began = last_log = time.perf_counter()
  done = 0
  for batch in common.eval_batches(num_images, image_block, image_batch, image_sharding):
    real = common.local_rows(batch.pop(common.MASK_KEY)).astype(bool)
    index = common.local_rows(batch.pop(common.INDEX_KEY))
    block_rows = []
    for captions, caption_real in caption_blocks:
      scores = common.local_rows(score_block(params, batch, captions))
      block_rows.append(scores[real][:, caption_real])
      done += 1
      now = time.perf_counter()
      if now - last_log >= log_every_seconds:
        last_log = now
        eta = (now - began) / done * (total - done)
        logging.info('%s: %d of %d blocks scored (%.0f s), ETA %.0f s', name, done, total,
                     now - began, eta)
    positions.append(index[real].astype(np.int64))
    rows.append(np.concatenate(block_rows, axis=1) if block_rows
                else np.zeros((int(real.sum()), 0), np.float32))
  logging.info('%s: %d x %d pairs scored in %.1f s', name, num_images, num_captions,
               time.perf_counter() - began)
  if not rows:
    return np.zeros((0,), np.int64), np.zeros((0, num_captions), np.float32)
  return np.concatenate(positions), np.concatenate(rows).astype(np.float32)


def process_metrics(positions: np.ndarray, scores: np.ndarray, caption_image: np.ndarray
                    ) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
  """Metrics of the score rows every process holds (`score_rows`), summed over
  processes: only per-caption vectors travel.

  Returns:
    (`summary`, per caption its top image positions int64 [C, k], per local
    image its top caption indices int64 [Li, k], the local text ranks [Li]).
  """
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  if not np.all(np.isfinite(scores)):
    raise ValueError('retrieval scores are not all finite: the model diverged')
  truth = common.process_sum(true_scores(scores, positions, caption_image))
  ranks_ir = common.process_sum(image_rank_counts(scores, positions, caption_image, truth))
  ranks_tr = text_ranks_of_rows(scores, positions, caption_image)
  tr = common.process_sum(recall_counts(ranks_tr))
  ir = recall_counts(ranks_ir)
  # Each caption's top images: every process's own top k, gathered by summing
  # into its slot, then merged.
  count, me = jax.process_count(), jax.process_index()
  k = min(TOP_K, int(common.process_sum(np.int64(len(positions)))))
  local_index, local_scores = top_candidates(scores, k, axis=0)  # [C, k']
  slot_scores = np.full((count, len(caption_image), k), -np.inf, np.float32)
  slot_images = np.zeros((count, len(caption_image), k), np.int64)
  slot_scores[me, :, :local_index.shape[1]] = local_scores
  slot_images[me, :, :local_index.shape[1]] = positions[local_index]
  finite_sum = common.process_sum(np.where(np.isfinite(slot_scores), slot_scores, 0.0))
  present = common.process_sum(np.isfinite(slot_scores))
  all_scores = np.where(present > 0, finite_sum, -np.inf)
  all_images = common.process_sum(slot_images)
  merged_scores = np.concatenate(list(all_scores), axis=1)    # [C, P * k]
  merged_images = np.concatenate(list(all_images), axis=1)
  order = np.lexsort((merged_images, -merged_scores), axis=1)[:, :k]
  top_images = np.take_along_axis(merged_images, order, axis=1)
  top_captions = top_candidates(scores, TOP_K, axis=1)[0]
  return summary(ir, tr), top_images, top_captions, ranks_tr


class RetrievalEvaluator:
  """IR/TR R@1/5/10 and r_mean over a split's full caption x image matrix, and
  the prediction files (module docstring).

  Config fields: split, batch_size (images per block, a multiple of the data
  shards), caption_block (captions per block; default batch_size),
  num_images (the split's first N images and their captions, as COCO's 1k
  folds; default all), log_steps.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: RetrievalModel, mesh: Mesh,
               workdir: str):
    self.name, self.log_steps = name, eval_config.log_steps
    self.image_block = eval_config.batch_size
    self.caption_block = eval_config.get('caption_block') or eval_config.batch_size
    self.design = config.model.name
    self.tokenizer, self.images, captions, index = open_split(config.data, self.design,
                                                              eval_config.split)
    limit = eval_config.get('num_images')
    keep = np.arange(len(captions))
    if limit:
      keep = keep[index.caption_image < limit]
    self.caption_image = index.caption_image[keep]
    self.image_rows = index.images[:limit] if limit else index.images
    records = [r for start in range(0, len(keep), 4096)
               for r in captions.read(keep[start:start + 4096])]
    self.texts = [tables.as_text(r['text']) for r in records]
    self.caption_ids = np.array([int(r['caption_id']) for r in records], np.int64)
    first = {}
    for r in records:
      first.setdefault(int(r['image_index']), tables.as_text(r['image_id']))
    self.image_ids = [first[int(i)] for i in self.image_rows]
    self.image_sharding = input_pipeline.batch_sharding(mesh, tuple(config.mesh.data_axes),
                                                        self.image_block)
    self.caption_sharding = NamedSharding(mesh, PartitionSpec())
    self.prediction_dir = paths.join(workdir, 'predictions')
    self._score = block_scorer(model, self.image_sharding, self.caption_sharding)

  def image_batch(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    regions = examples_lib.region_batch(self.design, self.images, self.image_rows[positions])
    return {k: regions[k] for k in IMAGE_KEYS}

  def caption_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.tokenizer.encode([self.texts[i] for i in indices])

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): ir/tr R@1/5/10, r_mean, num_captions, num_images."""
    positions, scores = score_rows(
        self._score, params, len(self.image_rows), self.image_batch, len(self.texts),
        self.caption_batch, self.image_block, self.caption_block, self.image_sharding,
        self.caption_sharding, name=self.name)
    metrics, top_images, top_captions, _ = process_metrics(positions, scores,
                                                           self.caption_image)
    write_predictions(paths.join(self.prediction_dir, f'{self.name}_step{step}'),
                      self.caption_ids, self.image_ids, positions, top_images, top_captions)
    yield from metrics.items()


def write_predictions(base: str, caption_ids: Sequence[Any], image_ids: Sequence[Any],
                      positions: np.ndarray, top_images: np.ndarray, top_captions: np.ndarray
                      ) -> None:
  """`<base>_ir.json` ([{"caption_id", "image_ids"}], every caption, from process
  0's merged top images) and `<base>_tr.json` ([{"image_id", "caption_ids"}], each
  process its images), in split order (`process_metrics`' outputs)."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  as_id = lambda value: value.item() if isinstance(value, np.generic) else value
  ir_records = [] if jax.process_index() else [
      {'_index': c, 'caption_id': as_id(caption_ids[c]),
       'image_ids': [as_id(image_ids[i]) for i in top_images[c]]}
      for c in range(len(caption_ids))]
  common.write_prediction_parts(base + '_ir.json', ir_records)
  common.write_prediction_parts(base + '_tr.json', [
      {'_index': int(p), 'image_id': as_id(image_ids[p]),
       'caption_ids': [as_id(caption_ids[c]) for c in top]}
      for p, top in zip(positions, top_captions)])


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`).

# Published fine-tuning recipes at `base`, as `config.train` fields.
RECIPES = {
    # ChenRocks/UNITER config/train-itm-flickr-base-8gpu.json: batch 40 per GPU
    # x 8 GPUs x 4 accumulation steps, lr 5e-5, 20k steps, warmup 2k, AdamW
    # (0.9, 0.98), wd 0.01, clip 2; margin 0.2, negative_size 1. Its
    # hard-negative config (train-itm-flickr-base-16gpu-hn.json: one caption and
    # one image per GPU and step, 16 GPUs x 8 accumulation steps, 5k steps,
    # warmup 500) is `HARD_NEGATIVE_RECIPE`.
    'uniter': dict(global_batch_size=1280, learning_rate=5e-5, warmup_fraction=0.1,
                   num_steps=20_000, adam_b2=0.98, weight_decay=0.01, grad_clip_norm=2.0),
    # vilbert-multi-task vilbert_tasks.yml RetrievalFlickr30k: batch 128, lr 2e-5,
    # 20 epochs of Flickr30k train (145,000 captions).
    'vilbert': dict(global_batch_size=128, learning_rate=2e-5, warmup_fraction=0.1,
                    num_steps=22_657),
}
# TASKS.md is silent on LXMERT's and VisualBERT's retrieval: UNITER's recipe.
RECIPES.update(lxmert=RECIPES['uniter'], visualbert=RECIPES['uniter'])
# UNITER's hard-negative variant (16gpu-hn): `--config.retrieval.hard_neg_pool=399
# --config.train.global_batch_size=128 --config.train.num_steps=5000
# --config.train.warmup_fraction=0.1` (hard_neg_size 31 is the default).
HARD_NEGATIVE_RECIPE = dict(global_batch_size=128, num_steps=5_000, warmup_fraction=0.1)
HARD_NEGATIVE_POOL = 399
# Caption length (word pieces with [CLS]/[SEP]): UNITER's max_txt_len,
# vilbert-multi-task's max_seq_length; LXMERT and VisualBERT: UNITER's.
TEXT_LENGTHS = {'uniter': 60, 'vilbert': 30, 'lxmert': 60, 'visualbert': 60}
WORLD_RECIPE = dict(global_batch_size=32, learning_rate=1e-4, warmup_fraction=0.1,
                    num_steps=600, log_every_steps=50, end_learning_rate=0.0)
# The world's evaluators score the full matrix of the split's first images
# (as COCO's 1k folds): the whole 300 x 1,500 would take an hour on 2 cores.
WORLD_VAL_IMAGES, WORLD_TEST_IMAGES = 50, 100
WORLD_EVAL_BLOCK = 32


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` a retrieval run: `config.retrieval`, the design's recipe and
  caption length (the world's for 'small'/'tiny'), evaluators on validation
  (every 200 steps on the world) and test (at the end)."""
  from vlpjax import config_lib  # pylint: disable=g-import-not-at-top
  world = size in config_lib.WORLD_SIZES
  config.task = 'retrieval'
  config.retrieval = default_retrieval_config()
  config.train.update(WORLD_RECIPE if world else RECIPES[config.model.name])
  if not world:
    config.data.max_text_len = TEXT_LENGTHS[config.model.name]
  steps = config.train.num_steps
  block = WORLD_EVAL_BLOCK if world else 64
  config.evals = ml_collections.ConfigDict(dict(
      retrieval_val=dict(type=EVAL_TYPE, split='validation', batch_size=block,
                         caption_block=block, num_images=WORLD_VAL_IMAGES if world else 0,
                         log_steps=200 if world else 2_000),
      retrieval_test=dict(type=EVAL_TYPE, split='test', batch_size=block, caption_block=block,
                          num_images=WORLD_TEST_IMAGES if world else 0, log_steps=steps)))
  config.checkpoint.every_steps = 200 if world else 2_000


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the model against the data (`vqa.check_model_against_data`) and the
  `config.retrieval` choices."""
  vqa.check_model_against_data(config)
  negative_counts(config.retrieval, config.model.name)
  return config


def make_model(config: ml_collections.ConfigDict) -> RetrievalModel:
  """The design's backbone with the score head."""
  return build_model(config)


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """One compiled step: the retrieval loss."""
  del config
  return ['retrieval']


objective_for_step = vqa.objective_for_step


def make_inputs(config: ml_collections.ConfigDict, batch: Mapping[str, jax.Array],
                rng: jax.Array, objective: str
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """RetrievalModel kwargs (features widened to float32); no targets (column 0
  of the scores is the positive)."""
  del config, rng, objective
  keys = TEXT_KEYS + IMAGE_KEYS
  kwargs = {k: batch[k] for k in keys + tuple(NEGATIVE_PREFIX + k for k in keys)}
  for key in ('region_feats', NEGATIVE_PREFIX + 'region_feats'):
    kwargs[key] = kwargs[key].astype(jnp.float32)
  return kwargs, {}


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, jax.Array], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The retrieval loss (`retrieval.loss`) and how often the positive scores first."""
  del targets, objective
  kind = resolve_loss(config.model.name, config.retrieval.loss)
  scores = outputs['scores']
  loss = (hinge_loss(scores, config.retrieval.margin) if kind == 'hinge'
          else four_way_loss(scores))
  return loss, {kind: loss, 'train_positive_first': positive_first(scores)}


def flops_per_example(config: ml_collections.ConfigDict,
                      input_specs: Mapping[str, jax.ShapeDtypeStruct], objective: str) -> float:
  """Forward + backward of the scored pairs, forward of the mined pools (the
  backbone's; the score head is negligible)."""
  from vlpjax import flops  # pylint: disable=g-import-not-at-top
  del objective  # one
  image_side, text_side = negative_counts(config.retrieval, config.model.name)
  pair = flops.forward_flops(config.model, input_specs['input_ids'].shape[1],
                             input_specs['region_feats'].shape[1], 0, components=())
  trained = 1 + image_side.scored + text_side.scored
  return pair * (3 * trained + image_side.pool + text_side.pool)


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """None beyond the config and vocabulary."""
  del config
  return {}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> dict[str, Any]:
  """Starts the score head from the `init.source` workdir run's matching head
  (`Design.matching_head`, its `matched_label` column), as UNITER's
  `init_output`. Without such a head (or with
  `retrieval.head_from_pretraining=False`) the fresh head stays."""
  from vlpjax import checkpointing, state as state_lib  # pylint: disable=g-import-not-at-top
  design = get_design(config.model.name)
  kind, _, directory = config.init.source.partition(':')
  name = design.matching_head
  if (kind != 'workdir' or not config.retrieval.head_from_pretraining or name is None
      or name not in checkpointing.workdir_param_keys(directory)):
    return dict(params)
  matching, step = checkpointing.restore_workdir_params(directory, subtree=name)
  head = score_head_from_matching(matching['kernel'], matching['bias'], design.matched_label)
  fresh = state_lib.to_host(params[SCORE_HEAD])
  head = {k: np.asarray(v, np.asarray(fresh[k]).dtype) for k, v in head.items()}
  logging.info('init: %s from %s/%s (step %d), column %d', SCORE_HEAD, directory, name, step,
               design.matched_label)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_params[SCORE_HEAD])
  return dict(params, **{SCORE_HEAD: state_lib.from_host(head, shardings)})


class RetrievalPredictor:
  """Scores and ranks captions against images of your own features (`vlpjax.load`).

  Every (caption, image) pair goes through the cross-encoder, in batches of
  `batch_size` pairs (the last one padded, so one shape compiles).

  Attributes:
    config: the run's config; model: the RetrievalModel; params: its params
    (first device); step: the checkpoint's step.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int | None,
               batch_size: int = 64):
    self.config = config
    self.design = get_design(config.model.name)
    self.tokenizer = vqa.run_tokenizer(config, workdir)
    self.batch_size = batch_size
    self.model = build_model(config)
    example = dict(self.tokenizer.encode(['?']),
                   **vqa.image_regions(config, self.design, *vqa.blank_image(config), 1))
    self.params, self.step, self._scores = vqa.restore_for_inference(
        self.model, example, workdir, step, 'scores')

  def scores(self, captions: Sequence[str], images: Sequence[vqa.Image]) -> np.ndarray:
    """float32 [C, I]: the score of every caption with every image (`vqa.Image`:
    features [N, F], boxes [N, 4] pixels, (width, height)); higher = better match."""
    if not captions or not images:
      raise ValueError(f'need captions and images, got {len(captions)} and {len(images)}')
    text = self.tokenizer.encode(list(captions))
    regions = [vqa.image_regions(self.config, self.design, *image, 1) for image in images]
    caption_of, image_of = np.divmod(np.arange(len(captions) * len(images)), len(images))
    scores = np.empty(len(caption_of), np.float32)
    for start in range(0, len(caption_of), self.batch_size):
      # The last batch wraps around to the first pairs, whose repeated scores are dropped.
      rows = np.arange(start, start + self.batch_size) % len(caption_of)
      batch = {k: v[caption_of[rows]] for k, v in text.items()}
      batch.update({k: np.concatenate([regions[i][k] for i in image_of[rows]])
                    for k in IMAGE_KEYS})
      real = min(self.batch_size, len(caption_of) - start)
      scores[start:start + real] = np.asarray(self._scores(self.params, batch))[:real]
    return scores.reshape(len(captions), len(images))

  def rank_images(self, caption: str, images: Sequence[vqa.Image], k: int = 5) -> list[int]:
    """Indices into `images` of the `k` best matches of `caption`, best first."""
    return [int(i) for i in np.argsort(-self.scores([caption], images)[0], kind='stable')[:k]]

  def rank_captions(self, image: vqa.Image, captions: Sequence[str], k: int = 5) -> list[int]:
    """Indices into `captions` of the `k` best descriptions of `image`, best first."""
    return [int(i) for i in np.argsort(-self.scores(captions, [image])[:, 0], kind='stable')[:k]]


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None
              ) -> RetrievalPredictor:
  """`vlpjax.load`'s object for a retrieval run: `scores(captions, images)`,
  `rank_images(caption, images)`, `rank_captions(image, captions)`."""
  return RetrievalPredictor(config, workdir, step)


def make_evaluators(config: ml_collections.ConfigDict, model: RetrievalModel, mesh: Mesh,
                    workdir: str) -> list[RetrievalEvaluator]:
  """The `config.evals` entries (all of type 'retrieval')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'retrieval', {EVAL_TYPE: RetrievalEvaluator}, model,
                                 mesh, workdir)
