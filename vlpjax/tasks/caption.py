"""Image captioning: each design writes a caption of an image's regions.

Shared TASKS.md "Captioning". None of the four originals captions; this task
follows Unified VLP and Oscar on the same task architecture as the others.

Sequence: the text slots `[CLS] w_1 .. w_n [SEP] [PAD] ..` (T =
`data.max_text_len`) and the design's regions, under the seq2seq mask
(`seq2seq_mask`, the backbone contract's full attention mask): regions see
regions only, a text slot sees the regions and the slots up to itself. The
single-stream designs apply it over their joint sequence; the two-stream ones
take its blocks (causal text self-attention, text->regions open,
regions->text closed), so the regions never depend on the caption.

Model (`CaptionModel`): the backbone and an LM head tied to the word table
(`heads.MaskedLMHead`, params 'lm_head', started from the `init.source`
run's MLM head, `Design.mlm_head`).

Objectives (`config.caption.objective`):
  'next_token'  slot p predicts the token of slot p+1 (the [SEP] included), the
                loss over every real target.
  'masked'      Unified VLP / Oscar: 15% of the caption's tokens ([SEP]
                included, [CLS] never), at most 3, are picked; 80% become
                [MASK], 10% a random word, 10% stay; the picked are predicted
                under the same mask.
  `label_smoothing` applies to either.

Decoding (`decode_batch`, `vlpjax.decoding`'s greedy or beam search): the
prefill runs the regions and `[CLS]` (for 'masked', `[CLS] [MASK]`) through
the backbone into the KV cache (`layers.Decoding`); each step feeds the
token just chosen ('masked': that token and a [MASK] after it, whose
prediction is read, as VLP decodes) and attends to the cache. [SEP] ends a
caption; at most `caption.max_len` tokens (default T - 1). `decoding=
'recompute'` runs the whole prefix through the model at every step instead
(the reference the cache is tested against, and the benchmark's baseline).

Data: the captions table (`data.captions_dataset`; the embedded world's by
default, COCO's Karpathy split or Flickr30k's via
`annotations_builder.CocoCaptions`): caption_id, text, image_index, image_id.
Training batches (`CaptionExamples`): input_ids, text_mask, token_type_ids
int32 [B, T]; region_feats [B, R, F], region_loc [B, R, L], region_mask
[B, R].

Evaluation (`CaptionEvaluator`, evaluators of type 'caption'): every image of
the split once (`ImageExamples`), decoded; BLEU-1..4, METEOR, ROUGE_L, CIDEr
(`evaluators.caption_metrics`, pycocoevalcap) against all its captions;
the results file `predictions/<name>_step<N>.json`, COCO's
`[{"image_id", "caption"}]`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from vlpjax import decoding as decoding_lib
from vlpjax.data import examples as examples_lib
from vlpjax.data import input_pipeline, tables
from vlpjax.data.tokenizer import BertTokenizer, read_vocab
from vlpjax.models import DESIGNS, get_design, get_model, heads, layers
from vlpjax.objectives import masking
from vlpjax.objectives.common import ratio
from vlpjax.tasks import vqa

TABLE = 'captions'
EVAL_TYPE = 'caption'
# The metric of the `caption_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'CIDEr'
LM_HEAD = 'lm_head'
CAPTION_KEYS = ('text', 'image_index')
OBJECTIVES = ('next_token', 'masked')
DECODINGS = ('cache', 'recompute')
# Unified VLP / Oscar masking: 15% of the caption tokens, at most 3.
MASK_PROB, MAX_MASKED = 0.15, 3
# TASKS.md: beam 5, at most 20 tokens on COCO.
PUBLISHED_BEAM, PUBLISHED_MAX_LEN = 5, 20
# TASKS.md names no fine-tuning recipe for captioning: every design uses one
# (batch 256, lr 3e-5, 30 epochs of the Karpathy train's 566,747 captions),
# not a published config of any of them.
RECIPE = dict(global_batch_size=256, learning_rate=3e-5, warmup_fraction=0.1,
              num_steps=66_415)
RECIPES = {name: RECIPE for name in DESIGNS}
# [CLS], the caption's 20 tokens with the [SEP].
TEXT_LENGTHS = {name: 1 + PUBLISHED_MAX_LEN for name in RECIPES}
# The embedded world: VQA's steps (minutes on 2 CPU cores), at twice its peak rate.
WORLD_RECIPE = dict(global_batch_size=32, learning_rate=2e-4, warmup_fraction=0.1,
                    num_steps=600, log_every_steps=50, end_learning_rate=0.0)
WORLD_EVAL_IMAGES = 200


def default_caption_config() -> ml_collections.ConfigDict:
  """The `config.caption` section."""
  return ml_collections.ConfigDict(dict(
      train_split='train',
      objective='next_token',   # OBJECTIVES
      label_smoothing=0.0,
      beam_size=1,              # 1: greedy
      length_penalty=0.0,       # beam search's ((5 + length) / 6) ** alpha
      max_len=ml_collections.config_dict.placeholder(int),  # None: data.max_text_len - 1
      decoding='cache',         # DECODINGS
      head_from_pretraining=True,
      # [PAD], [CLS], [SEP], [MASK]: `prepare` sets them from the run's vocabulary.
      token_ids=dict(pad=0, cls=101, sep=102, mask=103),
  ))


def with_vocab_token_ids(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `caption.token_ids` of the run's vocabulary (`data.vocab_file`
  or the tables'); an error if it lacks one of them."""
  vocab_file = tables.vocab_file(config.data)
  vocab = read_vocab(vocab_file)
  ids = {}
  for name in config.caption.token_ids:
    token = f'[{name.upper()}]'
    if token not in vocab:
      raise ValueError(f'{vocab_file} has no {token}, which captioning needs')
    ids[name] = vocab[token]
  config.caption.token_ids.update(ids)
  return config


def resolve_max_len(config: ml_collections.ConfigDict) -> int:
  """Tokens a caption may take ([SEP] included): `caption.max_len`, at most the
  text slots after [CLS] (one fewer for 'masked', whose steps feed a [MASK])."""
  slots = config.data.max_text_len - 1 - (config.caption.objective == 'masked')
  max_len = slots if config.caption.max_len is None else config.caption.max_len
  if not 1 <= max_len <= slots:
    raise ValueError(f'config.caption.max_len={max_len} must be in [1, {slots}]: the '
                     f'data.max_text_len={config.data.max_text_len} text slots hold [CLS], the '
                     f'caption and, for the masked objective, the [MASK] a step feeds')
  return max_len


# ----------------------------------------------------------------------------
# The model.


def seq2seq_mask(num_text: int, num_regions: int) -> np.ndarray:
  """bool [1, T+R, T+R] over [text; regions]: regions see regions; text slot t
  sees the regions and slots 0..t."""
  mask = np.zeros((num_text + num_regions,) * 2, bool)
  mask[:num_text, :num_text] = np.tril(np.ones((num_text, num_text), bool))
  mask[:, num_text:] = True
  return mask[None]


class CaptionModel(nn.Module):
  """A design's backbone plus the tied LM head.

  Params: {'backbone': the backbone's, 'lm_head': `heads.MaskedLMHead`'s}.
  """
  backbone: nn.Module
  vocab_size: int
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  float32_logits: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, token_type_ids: jax.Array,
               region_feats: jax.Array, region_loc: jax.Array, region_mask: jax.Array,
               positions: jax.Array, attention_mask: jax.Array,
               decoding: layers.Decoding | None = None, deterministic: bool = True
               ) -> dict[str, jax.Array]:
    """Token predictions at `positions`.

    Args:
      input_ids, token_type_ids: [B, Q] (Q = T, or a decoding step's new tokens);
      text_mask: [B, T] the text keys.
      region_feats: [B, R, F]; region_loc: [B, R, L]; region_mask: [B, R].
      positions: [B, P] int, indices into the Q tokens whose next (or masked)
        token is predicted.
      attention_mask: [1 or B, Q, T+R] rows of `seq2seq_mask`.
      decoding: the KV cache (`layers.Decoding`); None: no cache.

    Returns:
      {'logits': float32 [B, P, V'] (the padding ids at the lowest value)}.
    """
    outputs = self.backbone(input_ids, text_mask, region_feats, region_loc, region_mask,
                            token_type_ids=token_type_ids, deterministic=deterministic,
                            attention_mask=attention_mask, decoding=decoding)
    logits = heads.MaskedLMHead(self.vocab_size, dtype=jnp.dtype(self.dtype),
                                param_dtype=jnp.dtype(self.param_dtype),
                                float32_logits=self.float32_logits, name=LM_HEAD)(
        outputs['text'], positions, outputs['word_embeddings'])
    return {'logits': logits.astype(jnp.float32)}


def build_model(model_config: ml_collections.ConfigDict) -> CaptionModel:
  """The CaptionModel of `config.model`."""
  return CaptionModel(get_model(model_config, pretraining=False), model_config.vocab_size,
                      model_config.dtype, model_config.param_dtype,
                      model_config.float32_logits)


# ----------------------------------------------------------------------------
# Examples.


@dataclasses.dataclass
class CaptionExamples(vqa.PairExamples):
  """Training batches (module docstring) of the captions table's rows
  (`vqa.PairExamples`; `pairs`: the captions table, CAPTION_KEYS)."""

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The batch of caption rows `indices` [B]."""
    records = self.pairs.read(np.asarray(indices, np.int64).reshape(-1))
    batch = self.tokenizer.encode([tables.as_text(r['text']) for r in records])
    image_index = np.array([r['image_index'] for r in records], np.int64).reshape(-1)
    regions = examples_lib.region_batch(self.design, self.images, image_index)
    batch.update({k: regions[k] for k in vqa.REGION_KEYS})
    return batch


def open_examples(data_config: ml_collections.ConfigDict, design: str, split: str
                  ) -> CaptionExamples:
  """The examples of a split of the captions table for `design`."""
  return CaptionExamples(design, *vqa.open_text_inputs(data_config, design, TABLE, split,
                                                       CAPTION_KEYS))


@dataclasses.dataclass
class ImageExamples:
  """The images of a captions split, each once, with all their captions.

  Attributes:
    design: the design's name (region inputs).
    images: the images table.
    image_index: int64 [I], the split's images (rows of `images`) in first-caption order.
    image_ids: [I], their `image_id`s (the results file's).
    references: [I] lists of the images' captions.
  """
  design: str
  images: tables.ImageTable
  image_index: np.ndarray
  image_ids: np.ndarray
  references: list[list[str]]

  def __len__(self) -> int:
    return len(self.image_index)

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Region inputs (`vqa.REGION_KEYS`) of images `indices` [B] (positions in the split)."""
    regions = examples_lib.region_batch(
        self.design, self.images, self.image_index[np.asarray(indices, np.int64).reshape(-1)])
    return {k: regions[k] for k in vqa.REGION_KEYS}


def open_images(data_config: ml_collections.ConfigDict, design: str, split: str,
                num_images: int = 0) -> ImageExamples:
  """A captions split's images (the first `num_images`, 0: all) and their references."""
  _, images, captions = vqa.open_text_inputs(data_config, design, TABLE, split,
                                             ('text', 'image_index', 'image_id'))
  references: dict[int, list[str]] = {}
  image_ids: dict[int, Any] = {}
  for record in tables.read_all(captions):
    index = int(record['image_index'])
    references.setdefault(index, []).append(tables.as_text(record['text']))
    image_id = record['image_id']
    image_ids[index] = tables.as_text(image_id) if isinstance(image_id, bytes) else int(image_id)
  order = list(references)[:num_images or None]
  return ImageExamples(design, images, np.array(order, np.int64),
                       np.array([image_ids[i] for i in order], object),
                       [references[i] for i in order])


# ----------------------------------------------------------------------------
# Training.


def shifted_targets(input_ids: jax.Array, text_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Next-token targets: (positions [B, T-1] = 0..T-2, targets [B, T-1] the
  next slot's token, weights float32 [B, T-1], 1 where that slot is real)."""
  batch, length = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(length - 1, dtype=jnp.int32), (batch, length - 1))
  return positions, input_ids[:, 1:], text_mask[:, 1:].astype(jnp.float32)


def make_inputs(config: ml_collections.ConfigDict, batch: Mapping[str, jax.Array],
                rng: jax.Array, objective: str
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """CaptionModel kwargs under the seq2seq mask, and the (next or masked) token targets."""
  input_ids, text_mask = batch['input_ids'], batch['text_mask']
  kwargs = {k: batch[k] for k in ('input_ids', 'text_mask', 'token_type_ids', 'region_loc',
                                  'region_mask')}
  kwargs['region_feats'] = batch['region_feats'].astype(jnp.float32)
  kwargs['attention_mask'] = jnp.asarray(seq2seq_mask(input_ids.shape[1],
                                                      batch['region_mask'].shape[1]))
  if objective == 'next_token':
    positions, targets, weights = shifted_targets(input_ids, text_mask)
  else:
    ids = config.caption.token_ids
    masked = masking.mask_tokens(
        rng, input_ids, text_mask, mask_token_id=ids.mask,
        special_token_ids=(ids.cls, ids.pad), vocab_size=config.model.vocab_size,
        max_predictions=min(MAX_MASKED, input_ids.shape[1]), mask_prob=MASK_PROB,
        at_least_one=True)
    kwargs['input_ids'] = masked.input_ids
    positions, targets, weights = masked.positions, masked.targets, masked.weights
  kwargs['positions'] = positions
  return kwargs, dict(targets=targets, weights=weights)


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
               label_smoothing: float, vocab_size: int) -> jax.Array:
  """Mean (label-smoothed) cross-entropy over the weighted positions.

  logits: [B, P, V'] (V' >= vocab_size, the padding ids at the lowest value);
  targets, weights: [B, P]. The smoothing mass spreads over the vocabulary's
  `vocab_size` ids only.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[..., :vocab_size]
  one_hot = jax.nn.one_hot(targets, vocab_size, dtype=jnp.float32)
  soft = optax.smooth_labels(one_hot, label_smoothing) if label_smoothing else one_hot
  per_token = -jnp.sum(soft * log_probs, axis=-1)
  return ratio(jnp.sum(per_token * weights), jnp.maximum(jnp.sum(weights), 1.0))


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, jax.Array], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The token loss and the batch's token accuracy."""
  logits, weights = outputs['logits'], targets['weights']
  loss = token_loss(logits, targets['targets'], weights, config.caption.label_smoothing,
                    config.model.vocab_size)
  correct = (jnp.argmax(logits, -1) == targets['targets']).astype(jnp.float32)
  accuracy = ratio(jnp.sum(correct * weights), jnp.maximum(jnp.sum(weights), 1.0))
  return loss, {objective: loss, 'token_accuracy': accuracy}


# ----------------------------------------------------------------------------
# Decoding.


def decode_batch(model: CaptionModel, params: Any, regions: Mapping[str, jax.Array],
                 config: ml_collections.ConfigDict) -> decoding_lib.DecodeResult:
  """Captions of a batch of images.

  Args:
    model: the CaptionModel; params: its params.
    regions: region_feats [B, R, F], region_loc [B, R, L], region_mask [B, R].
    config: the run's config (`caption.*`, `data.max_text_len`, the special ids).

  Returns:
    `vlpjax.decoding.DecodeResult`: tokens int32 [B, max_len] ([SEP] included,
    then padding), lengths, log_prob, score [B].
  """
  caption = config.caption
  if caption.objective not in OBJECTIVES:
    raise ValueError(f'config.caption.objective must be one of {OBJECTIVES}, '
                     f'got {caption.objective!r}')
  if caption.decoding not in DECODINGS:
    raise ValueError(f'config.caption.decoding must be one of {DECODINGS}, '
                     f'got {caption.decoding!r}')
  ids = config.caption.token_ids
  max_len = resolve_max_len(config)
  num_text = config.data.max_text_len
  feats = regions['region_feats'].astype(jnp.float32)
  loc, region_mask = regions['region_loc'], regions['region_mask']
  batch, num_regions = region_mask.shape
  full_mask = jnp.asarray(seq2seq_mask(num_text, num_regions))
  # A [MASK] after the fed token is what 'masked' models predict from.
  with_mask = caption.objective == 'masked'
  # The token chosen i-th (from 0) sits in slot i + 1; its prediction slot:
  read_offset = 2 if with_mask else 1

  prompt = np.zeros((1, num_text), np.int32)
  prompt[0, 0] = ids.cls
  if with_mask:
    prompt[0, 1] = ids.mask
  prompt = jnp.broadcast_to(jnp.asarray(prompt), (batch, num_text))
  prompt_read = read_offset - 1  # [CLS] (next_token) or the [MASK] after it

  def full_logits(params, tokens, feats, loc, region_mask, read):
    """Logits [N, V'] at slot `read` of the whole sequence `tokens` [N, T]."""
    rows = tokens.shape[0]
    outputs = model.apply({'params': params}, tokens, jnp.ones((rows, num_text), jnp.int32),
                          jnp.zeros_like(tokens), feats, loc, region_mask,
                          jnp.full((rows, 1), read, jnp.int32), full_mask)
    return outputs['logits'][:, 0]

  if caption.decoding == 'recompute':
    state = dict(tokens=prompt, region_feats=feats, region_loc=loc, region_mask=region_mask)
    first_logits = full_logits(params, prompt, feats, loc, region_mask, prompt_read)

    def step_fn(state, tokens, index):
      slot = index + 1
      buffer = jax.lax.dynamic_update_slice_in_dim(state['tokens'], tokens[:, None], slot, 1)
      if with_mask:
        buffer = jax.lax.dynamic_update_slice_in_dim(
            buffer, jnp.full_like(tokens[:, None], ids.mask), slot + 1, 1)
      logits = full_logits(params, buffer, state['region_feats'], state['region_loc'],
                           state['region_mask'], slot + read_offset - 1)
      return logits, dict(state, tokens=buffer)
  else:
    outputs, variables = model.apply(
        {'params': params}, prompt, jnp.ones((batch, num_text), jnp.int32),
        jnp.zeros_like(prompt), feats, loc, region_mask,
        jnp.full((batch, 1), prompt_read, jnp.int32), full_mask,
        decoding=layers.Decoding.prefill(), mutable=['cache'])
    first_logits = outputs['logits'][:, 0]
    state = dict(cache=variables['cache'], region_mask=region_mask)
    feat_shape, loc_shape = feats.shape[1:], loc.shape[1:]

    def step_fn(state, tokens, index):
      rows = tokens.shape[0]
      slot = index + 1
      new = tokens[:, None]
      if with_mask:
        new = jnp.concatenate([new, jnp.full_like(new, ids.mask)], axis=1)
      # The new tokens' rows of the full mask; the region side is cached.
      step_mask = jax.lax.dynamic_slice_in_dim(full_mask, slot, new.shape[1], axis=1)
      outputs, variables = model.apply(
          {'params': params, 'cache': state['cache']}, new,
          jnp.ones((rows, num_text), jnp.int32), jnp.zeros_like(new),
          jnp.zeros((rows,) + feat_shape, jnp.float32), jnp.zeros((rows,) + loc_shape,
                                                                  loc.dtype),
          state['region_mask'], jnp.full((rows, 1), new.shape[1] - 1, jnp.int32), step_mask,
          decoding=layers.Decoding.step_at(slot), mutable=['cache'])
      return outputs['logits'][:, 0], dict(state, cache=variables['cache'])

  common = dict(max_len=max_len, eos_id=ids.sep, pad_id=ids.pad)
  if caption.beam_size == 1:
    return decoding_lib.greedy_decode(step_fn, state, first_logits, **common)
  return decoding_lib.beam_search(step_fn, state, first_logits, beam_size=caption.beam_size,
                                  length_penalty=caption.length_penalty, **common)


def caption_texts(tokenizer: BertTokenizer, tokens: np.ndarray, lengths: np.ndarray
                  ) -> list[str]:
  """Decoded token rows [N, L] (up to their lengths, [SEP] dropped) -> strings."""
  return [tokenizer.decode(row[:length]) for row, length in zip(np.asarray(tokens),
                                                                 np.asarray(lengths))]


def decoding_step(model: CaptionModel, config: ml_collections.ConfigDict,
                  sharding: jax.sharding.NamedSharding | None
                  ) -> Callable[[Any, Mapping[str, jax.Array]], decoding_lib.DecodeResult]:
  """The jitted (params, region batch) -> DecodeResult, sharded as the batch."""
  def run(params, batch):
    return decode_batch(model, params, {k: batch[k] for k in vqa.REGION_KEYS}, config)
  return jax.jit(run, out_shardings=sharding)


# ----------------------------------------------------------------------------
# Evaluation.


class CaptionEvaluator(vqa.SplitEvaluator):
  """COCO caption metrics on a split's images (`eval_config.num_images`: the
  first ones, 0 all), and the results file.

  Each process decodes its rows of every batch; the captions are gathered
  over processes (`process_allgather`) so that every process scores the
  same, complete set; process 0 writes `<workdir>/predictions/<name>_step<N>.json`.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: CaptionModel, mesh: Mesh,
               workdir: str):
    super().__init__(name, eval_config, config, mesh, workdir)
    self.images = open_images(config.data, config.model.name, eval_config.split,
                              eval_config.get('num_images', 0))
    self.tokenizer = BertTokenizer(tables.vocab_file(config.data), config.data.max_text_len,
                                   lowercase=config.data.lowercase)
    self._decode = decoding_step(model, config, self.sharding)

  def captions(self, params: Any) -> list[str]:
    """A caption of each of the split's images, in order."""
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    # Decoding is dispatched batch after batch; the results are gathered once.
    results = [(result.tokens, result.lengths, batch[common.INDEX_KEY])
               for batch in common.eval_batches(len(self.images), self.batch_size,
                                                self.images.examples, self.sharding)
               for result in [self._decode(params, batch)]]
    gathered = multihost_utils.process_allgather(results, tiled=True)
    tokens, lengths, index = (np.concatenate([np.asarray(part[i]) for part in gathered])
                              for i in range(3))
    real = index >= 0
    texts = caption_texts(self.tokenizer, tokens[real], lengths[real])
    ordered = [''] * len(self.images)
    for i, text in zip(index[real], texts):
      ordered[int(i)] = text
    return ordered

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): the caption metrics and the image count."""
    from vlpjax.evaluators import caption_metrics  # pylint: disable=g-import-not-at-top
    texts = self.captions(params)
    keys = range(len(texts))
    scores = caption_metrics.score_captions(dict(zip(keys, texts)),
                                            dict(zip(keys, self.images.references)))
    if jax.process_index() == 0:
      caption_metrics.write_results(self.prediction_path(step),
                                    dict(zip(self.images.image_ids, texts)))
    yield from scores.items()
    yield 'count', float(len(texts))


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`).


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` a captioning run: `config.caption`, the recipe and text
  length (the world's for 'small'/'tiny'), evaluators of type 'caption' on
  validation (every 200 steps on the world, on its first WORLD_EVAL_IMAGES
  images) and test (at the end); at base beam 5 as the published numbers."""
  world = vqa.configure_finetuning(config, size, 'caption', default_caption_config(), RECIPES,
                                   TEXT_LENGTHS)
  config.evals.caption_val.num_images = WORLD_EVAL_IMAGES if world else 0
  config.evals.caption_test.num_images = 0
  if world:
    config.train.update(WORLD_RECIPE)
    config.evals.caption_test.log_steps = config.train.num_steps
  else:
    config.caption.beam_size = PUBLISHED_BEAM


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the model against the data and the `config.caption` choices, and
  sets the vocabulary's token ids (`with_vocab_token_ids`)."""
  vqa.check_model_against_data(config)
  with_vocab_token_ids(config)
  for field, value, choices in (('objective', config.caption.objective, OBJECTIVES),
                                ('decoding', config.caption.decoding, DECODINGS)):
    vqa.choose(f'caption.{field}', value, choices)
  if config.caption.beam_size < 1:
    raise ValueError(f'config.caption.beam_size must be >= 1, got {config.caption.beam_size}')
  resolve_max_len(config)
  return config


def make_model(config: ml_collections.ConfigDict) -> CaptionModel:
  """The design's backbone with the tied LM head."""
  return build_model(config.model)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable batches of the captions table's `caption.train_split`."""
  split = config.caption.train_split
  return vqa.task_train_iterator(config, mesh, open_examples(config.data, config.model.name,
                                                             split), split, TABLE)


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """One compiled step: `caption.objective`."""
  return [vqa.choose('caption.objective', config.caption.objective, OBJECTIVES)]


objective_for_step = vqa.objective_for_step


def flops_per_example(config: ml_collections.ConfigDict,
                      input_specs: Mapping[str, jax.ShapeDtypeStruct], objective: str) -> float:
  """The design's backbone and the LM head at every predicted position."""
  from vlpjax import flops  # pylint: disable=g-import-not-at-top
  del objective  # either one predicts at `positions`
  return flops.model_flops_per_example(config.model, input_specs['input_ids'].shape[1],
                                       input_specs['region_feats'].shape[1],
                                       input_specs['positions'].shape[1], components=('mlm',))


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """None beyond the config and vocabulary."""
  del config
  return {}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> dict[str, Any]:
  """Starts the LM head from the `init.source` checkpoint's MLM head
  (`Design.mlm_head`: a vlpjax run's 'workdir:DIR', or the params of a converted
  published pretraining checkpoint, 'orbax:DIR'), whose decoder is the same tied
  word table. Without one (or with `caption.head_from_pretraining=False`) the
  fresh head stays."""
  from vlpjax import checkpointing  # pylint: disable=g-import-not-at-top
  name = get_design(config.model.name).mlm_head
  kind, _, directory = config.init.source.partition(':')
  if not config.caption.head_from_pretraining or kind not in ('workdir', 'orbax'):
    return dict(params)
  if kind == 'workdir':
    if name not in checkpointing.workdir_param_keys(directory):
      return dict(params)
    head, step = checkpointing.restore_workdir_params(directory, abstract_params[LM_HEAD],
                                                      subtree=name)
    logging.info('init: %s from %s/%s (step %d)', LM_HEAD, directory, name, step)
  else:
    if name not in checkpointing.stored_top_level_keys(directory):
      return dict(params)
    head = checkpointing.restore_params(directory, abstract_params[LM_HEAD], subtree=name)
    logging.info('init: %s from %s/%s', LM_HEAD, directory, name)
  return dict(params, **{LM_HEAD: head})


class CaptionPredictor:
  """Captions images of your own features (`vlpjax.load`).

  Attributes:
    config: the run's config; model: the CaptionModel; params: its params
    (first device); step: the checkpoint's step.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int | None):
    self.config = config
    self.design = get_design(config.model.name)
    self.tokenizer = vqa.run_tokenizer(config, workdir)
    self.model = build_model(config.model)
    regions = vqa.image_regions(config, self.design, *vqa.blank_image(config), 1)
    example = dict(self.tokenizer.encode(['?']), **regions)
    example['positions'] = np.zeros((1, 1), np.int32)
    example['attention_mask'] = seq2seq_mask(config.data.max_text_len,
                                             regions['region_mask'].shape[1])
    self.params, self.step, _ = vqa.restore_for_inference(self.model, example, workdir, step,
                                                          'logits')
    self._decode = decoding_step(self.model, config, None)

  def caption(self, images: Sequence[vqa.Image], batch_size: int = 16) -> list[str]:
    """A caption of each image (`vqa.Image`: features [N, F], boxes [N, 4] in
    pixels, (width, height)), decoded `batch_size` at a time: the last batch
    is padded with copies of the last image, so one program serves any count."""
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    texts = []
    for start in range(0, len(images), batch_size):
      chunk = list(images[start:start + batch_size])
      chunk += chunk[-1:] * (batch_size - len(chunk))
      parts = [vqa.image_regions(self.config, self.design, *image, 1) for image in chunk]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in vqa.REGION_KEYS}
      result = self._decode(self.params, batch)
      texts += caption_texts(self.tokenizer, result.tokens, result.lengths)
    return texts[:len(images)]


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None
              ) -> CaptionPredictor:
  """`vlpjax.load`'s object for a captioning run: `caption(images)`."""
  return CaptionPredictor(config, workdir, step)


def make_evaluators(config: ml_collections.ConfigDict, model: CaptionModel, mesh: Mesh,
                    workdir: str) -> list[CaptionEvaluator]:
  """The `config.evals` entries (all of type 'caption')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'caption', {EVAL_TYPE: CaptionEvaluator}, model,
                                 mesh, workdir)
