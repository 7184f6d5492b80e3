"""Text and image records -> model inputs: the pairs, their negatives, region inputs.

`BatchAssembler` (`make_batch_assembler` opens its tables) is one vectorised
step per batch of sentence indices: read the text records, draw negatives,
tokenise, gather the image records of the batch in one ArrayRecord read
(`tables.ImageTable.gather`), build each design's region inputs
(`region_inputs`). `input_pipeline` maps it over the shuffled sentence stream.

Pair sampling. Every random choice for an example is a hash of (seed, epoch,
sentence index, stream): deterministic per example, independent of batch size,
worker count and process count, and vectorised over the batch (a numpy Generator
per example would cost tens of microseconds of a ~300 us budget). Mismatches
follow the design's `pairing` (`vlpjax.models.design`): the sentence replaced by
one about another image; the image replaced by that of a sentence about another
image (negatives from the split's own images); or `[CLS] a [SEP] b [SEP]` with b
another caption of the same image (matched) or of another image. `match_label`
is in the design's convention (`Design.matched_label`).

Regions. Detector order is kept and truncated to `max_regions`; padded slots are
zero with `region_mask` 0. A design may put slots before the detector regions
(`Design.leading_slots`, filled by the design: ViLBERT's [IMG]) and gives its own
location features (`Design.location_features`). `class_probs` is emitted only
for the designs whose objectives use it (`Design.needs_class_probs`): [B, R, C].

Image QA (`data.qa=True`, designs with `recipe.image_qa`): the sentence pool is
the captions followed by the VQA questions; a question keeps its soft answer
scores, `qa_valid` is 1 only for a matched question, and `shows_question` is 1
where the pair's sentence (after any replacement) is a question.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np

from vlpjax.data import tables
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.models import design as design_lib


# Attempts at drawing a sentence about another image before giving up.
MAX_NEGATIVE_DRAWS = 32


# ----------------------------------------------------------------------------
# Per-example randomness: a hash of integer keys.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection on uint64 with good avalanche."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hashed_uniform(*keys: int | np.ndarray) -> np.ndarray:
  """Uniform floats in [0, 1) that depend only on the integer `keys` (broadcast)."""
  with np.errstate(over='ignore'):
    h = np.zeros(np.broadcast_shapes(*(np.shape(k) for k in keys)), np.uint64)
    for key in keys:
      h = _mix(h ^ (np.asarray(key).astype(np.uint64) + _GOLDEN))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _draw_index(u: np.ndarray, n: int | np.ndarray) -> np.ndarray:
  """Integers uniform in [0, n) from uniforms `u`."""
  return np.minimum((u * n).astype(np.int64), n - 1)


# Streams of `hashed_uniform`: one per independent choice.
_MISMATCH, _NEGATIVE, _PARTNER, _CAPTION = 0, 1, 2, 3


# ----------------------------------------------------------------------------
# Assembling.


def region_inputs(design: str | design_lib.Design, images: dict[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
  """The design's region inputs (see module docstring), in place where possible.

  Args:
    design: the model's design, or its name.
    images: `tables.ImageTable.gather(indices, first_slot=design.leading_slots)`.

  Returns:
    region_feats [B, S, F] (as gathered), region_loc float32 [B, S, L],
    region_mask int32 [B, S] and the per-region labels; S = leading slots +
    max_regions.
  """
  design = design_lib.as_design(design)
  first = design.leading_slots
  feats, boxes, count = images['feats'], images['boxes'], images['count']
  slot = np.arange(feats.shape[1])[None, :]
  mask = (slot >= first) & (slot < first + count[:, None])
  size = np.stack([images['image_w'], images['image_h']], -1)[:, None, :]  # [B, 1, 2]
  corners = boxes / np.concatenate([size, size], -1)                      # [B, S, 4]
  loc = design.location_features(corners) * mask[..., None]
  if design.fill_leading_slots is not None:
    design.fill_leading_slots(feats, loc, mask, count)
  labels = {k: images[k] for k in tables.REGION_LABEL_KEYS if k in images}
  return dict(region_feats=feats, region_loc=loc.astype(np.float32),
              region_mask=mask.astype(np.int32), **labels)


def region_batch(design: str | design_lib.Design, images: tables.ImageTable,
                 image_indices: np.ndarray) -> dict[str, np.ndarray]:
  """The design's region inputs for images `image_indices` [B] of `images`:
  region_feats [B, S, F], region_loc [B, S, L], region_mask [B, S] and the
  per-region labels (see `region_inputs`); `design` is one or its name."""
  design = design_lib.as_design(design)
  return region_inputs(design, images.gather(image_indices, first_slot=design.leading_slots))


@dataclasses.dataclass(frozen=True)
class CaptionGroups:
  """The captions of each image, for drawing another caption of the same image.

  order: caption indices sorted by image [S]; start: [num_images + 1], image i's
  captions are order[start[i]:start[i + 1]]; rank: position of each caption in order.
  """
  order: np.ndarray
  start: np.ndarray
  rank: np.ndarray

  @classmethod
  def from_image_index(cls, image_index: np.ndarray, num_images: int) -> CaptionGroups:
    order = np.argsort(image_index, kind='stable')
    start = np.searchsorted(image_index[order], np.arange(num_images + 1))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return cls(order=order, start=start, rank=rank)

  def partner(self, caption: np.ndarray, image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Another caption of `image` for each `caption` [B] (itself when alone), by `u`."""
    first, count = self.start[image], self.start[image + 1] - self.start[image]
    others = np.maximum(count - 1, 1)
    pick = _draw_index(u, others)
    pick += pick >= self.rank[caption] - first  # skip the caption itself
    return np.where(count > 1, self.order[first + np.minimum(pick, count - 1)], caption)


@dataclasses.dataclass
class BatchAssembler:
  """Turns a batch of positions in the shuffled sentence stream into model inputs.

  Called as `assembler(epochs [B], sentence_indices [B])` (`endless_batches`):
  row j is sentence `sentence_indices[j]` as drawn in epoch `epochs[j]` (an int:
  the same epoch for all). With `draw_negatives=False` every row is its matched
  pair (a batch of a step whose losses see positives only, e.g. UNITER's MLM).
  With `captions_only=True` a row whose sentence is not a caption (a VQA
  question) shows a caption drawn uniformly instead, a hash of (seed, epoch,
  index) as every other choice, and negatives are captions too (a first stage
  without questions, e.g. LXMERT's before image QA joins).
  """
  design: design_lib.Design
  tokenizer: BertTokenizer
  images: tables.ImageTable
  sentences: Sequence[tables.Table]  # in index order: captions[, vqa]
  seed: int
  mismatch_prob: float
  num_answers: int | None = None
  caption_groups: CaptionGroups | None = None  # VisualBERT's matched second captions

  def __post_init__(self):
    self._offsets = np.cumsum([0] + [len(s) for s in self.sentences])
    self.num_sentences = int(self._offsets[-1])
    self.num_captions = int(self._offsets[1])  # the captions table comes first

  def read_sentences(self, indices: np.ndarray) -> list[dict[str, Any]]:
    """Records of sentence `indices` from whichever table holds each."""
    table = np.searchsorted(self._offsets, indices, side='right') - 1
    records = [None] * len(indices)
    for t, source in enumerate(self.sentences):
      rows = np.flatnonzero(table == t)
      if rows.size:
        for row, record in zip(rows, source.read(indices[rows] - self._offsets[t])):
          records[row] = record
    return records

  def _sentence_text(self, record: dict[str, Any]) -> str:
    return tables.as_text(record['text'] if 'text' in record else record['question'])

  def _negative_sentences(self, anchor: np.ndarray, anchor_image: np.ndarray,
                          epoch: np.ndarray, captions_only: bool = False
                          ) -> list[dict[str, Any]]:
    """For each anchor, the record of a random sentence (caption, with
    `captions_only`) about another image."""
    n = self.num_captions if captions_only else self.num_sentences
    if n < 2:
      raise ValueError(f'{n} sentence(s): pairs need sentences about two images')
    records = [None] * len(anchor)
    todo = np.arange(len(anchor))
    for attempt in range(MAX_NEGATIVE_DRAWS):
      if not todo.size:
        return records
      u = hashed_uniform(self.seed, epoch[todo], anchor[todo], _NEGATIVE, attempt)
      candidate = _draw_index(u, n - 1)
      candidate += candidate >= anchor[todo]  # never the anchor itself
      found = self.read_sentences(candidate)
      ok = self._image_index(candidate, found) != anchor_image[todo]
      for row, i in zip(todo[ok], np.flatnonzero(ok)):
        records[row] = found[i]
      todo = todo[~ok]
    if not todo.size:
      return records
    raise ValueError(f'no sentence about another image found in {MAX_NEGATIVE_DRAWS} '
                     f'draws for sentences {anchor[todo].tolist()}: does the text table '
                     'describe more than one image?')

  def _image_index(self, sentences: np.ndarray, records: list[dict[str, Any]]) -> np.ndarray:
    image = np.array([r['image_index'] for r in records], np.int64).reshape(-1)
    bad = (image < 0) | (image >= self.images.num_images)
    if bad.any():
      raise ValueError(f'sentences {sentences[bad].tolist()} refer to images '
                       f'{image[bad].tolist()} outside the images table '
                       f'{self.images.name} ({self.images.num_images} images)')
    return image

  def __call__(self, epochs: np.ndarray | int, anchor: np.ndarray,
               draw_negatives: bool = True, captions_only: bool = False
               ) -> dict[str, np.ndarray]:
    anchor = np.asarray(anchor, np.int64)
    b = len(anchor)
    epoch = np.broadcast_to(np.asarray(epochs, np.int64), (b,))
    if captions_only:
      anchor = self._as_captions(anchor, epoch)
    records = self.read_sentences(anchor)
    anchor_image = self._image_index(anchor, records)
    mismatched = hashed_uniform(self.seed, epoch, anchor, _MISMATCH) < self.mismatch_prob
    mismatched &= draw_negatives
    swap = np.flatnonzero(mismatched)
    negatives = self._negative_sentences(anchor[swap], anchor_image[swap], epoch[swap],
                                         captions_only)
    texts = [self._sentence_text(r) for r in records]
    pairs = None
    image_index = anchor_image.copy()
    if self.design.pairing == design_lib.REPLACE_IMAGE:
      # The image is that of a random sentence about another image, so negatives
      # come from this split's images.
      image_index[swap] = self._image_index(anchor[swap], negatives)
    elif self.design.pairing == design_lib.SECOND_CAPTION:
      keep = np.flatnonzero(~mismatched)
      pairs = [None] * b
      for row, text in zip(keep, self._partner_captions(anchor[keep], anchor_image[keep],
                                                        epoch[keep])):
        pairs[row] = text
      for row, record in zip(swap, negatives):
        pairs[row] = self._sentence_text(record)
    shown = list(records)  # the record of the sentence each pair shows
    if self.design.pairing == design_lib.REPLACE_CAPTION:
      for row, record in zip(swap, negatives):
        texts[row] = self._sentence_text(record)
        shown[row] = record
    batch = self.tokenizer.encode(texts, pairs)
    matched = self.design.matched_label
    batch['match_label'] = np.where(mismatched, 1 - matched, matched).astype(np.int32)
    batch.update(region_batch(self.design, self.images, image_index))
    if self.num_answers is not None:
      batch.update(self._qa_targets(records, shown, mismatched))
    return batch

  def _as_captions(self, anchor: np.ndarray, epoch: np.ndarray) -> np.ndarray:
    """`anchor` [B] with each index past the caption table replaced by a random caption."""
    drawn = _draw_index(hashed_uniform(self.seed, epoch, anchor, _CAPTION), self.num_captions)
    return np.where(anchor < self.num_captions, anchor, drawn)

  def _partner_captions(self, anchor: np.ndarray, anchor_image: np.ndarray,
                        epoch: np.ndarray) -> list[str]:
    u = hashed_uniform(self.seed, epoch, anchor, _PARTNER)
    partner = self.caption_groups.partner(anchor, anchor_image, u)
    return [self._sentence_text(r) for r in self.read_sentences(partner)]

  def _qa_targets(self, records: list[dict[str, Any]], shown: list[dict[str, Any]],
                  mismatched: np.ndarray) -> dict[str, np.ndarray]:
    scores = np.zeros((len(records), self.num_answers), np.float32)
    is_question = np.zeros((len(records),), bool)
    for row, record in enumerate(records):
      if 'answer_labels' in record:
        is_question[row] = True
        scores[row, record['answer_labels']] = record['answer_scores']
    valid = is_question & ~mismatched
    scores *= valid[:, None]
    shows_question = np.array(['question' in r for r in shown], np.float32)
    return dict(answer_scores=scores, qa_valid=valid.astype(np.float32),
                shows_question=shows_question)


def make_batch_assembler(data_config: ml_collections.ConfigDict, design: design_lib.Design, *,
                         split: str, seed: int) -> BatchAssembler:
  """The tables of `split` and the design's pairing, as a `BatchAssembler`.

  `assembler(0, indices)` gives the pairs of sentences `indices` drawn as in
  epoch 0: deterministic, e.g. for a validation loss.
  """
  tokenizer = BertTokenizer(tables.vocab_file(data_config), data_config.max_text_len,
                            lowercase=data_config.lowercase)
  images = tables.open_image_table(data_config, with_class_probs=design.needs_class_probs)
  sentences = [tables.Table(tables.open_table(data_config, 'captions', split),
                            ('text', 'image_index'),
                            name=tables.table_name(data_config, 'captions'))]
  tables.check_same_images(data_config, 'captions', split)
  num_answers = None
  if data_config.qa:
    sentences.append(tables.Table(tables.open_table(data_config, 'vqa', split),
                                  ('question', 'image_index', 'answer_labels',
                                   'answer_scores'),
                                  name=tables.table_name(data_config, 'vqa')))
    tables.check_same_images(data_config, 'vqa', split)
    num_answers = len(tables.answer_vocab(data_config))
  caption_groups = None
  if design.pairing == design_lib.SECOND_CAPTION:
    caption_groups = CaptionGroups.from_image_index(tables.read_image_indices(sentences[0]),
                                                    images.num_images)
  return BatchAssembler(
      design=design, tokenizer=tokenizer, images=images, sentences=sentences,
      seed=seed, mismatch_prob=data_config.mismatch_prob,
      num_answers=num_answers, caption_groups=caption_groups)
