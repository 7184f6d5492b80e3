"""What a fusion design answers, so that shared modules ask instead of testing names.

Each design module `vlpjax.models.<name>` defines `DESIGN`, a `Design`: its Flax
modules, its region inputs, its image-text pairing convention, its pretraining
recipe, its FLOPs formula, its optimiser defaults and weight-decay rule. The
input pipeline, the objectives, the train step, the FLOPs count and the weight
converters call `get_design(config.model.name)` and read these fields.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

DESIGNS = ('visualbert', 'vilbert', 'lxmert', 'uniter')

# How a mismatched image-text pair is made (shared MODELS.md).
REPLACE_CAPTION = 'replace_caption'  # the sentence is one about another image
REPLACE_IMAGE = 'replace_image'      # the image is that of a sentence about another image
SECOND_CAPTION = 'second_caption'    # `[CLS] a [SEP] b [SEP]`, b about the image or not
PAIRINGS = (REPLACE_CAPTION, REPLACE_IMAGE, SECOND_CAPTION)


@dataclasses.dataclass(frozen=True)
class PretrainingRecipe:
  """How a design pretrains (`vlpjax.objectives.pretraining` reads it).

  Attributes:
    components: every loss the design has (names of `config.pretrain.tasks`).
    default_tasks: the losses the original trains.
    mix: 'sum' (every step sums the losses) or 'sample' (each step one task,
      drawn by `default_ratios`).
    default_ratios: relative task frequencies for mix 'sample'.
    random_token_min: lowest id MLM may draw as a random word.
    conditional_masking: one modality masked per batch (UNITER): mix must be
      'sample', and the backbone takes `masked_regions`.
    at_least_one: MLM and region masking mask at least one position per example.
    skip_first_region: region 0 (ViLBERT's [IMG]) is never masked.
    mask_regions: (rng, region_feats [B, R, F], region_mask [B, R], picked
      [B, R]) -> the masked features [B, R, F]; None without region losses.
    positives_only: every loss but matching sees matched pairs only (weight 0
      on the others).
    extra_losses: (outputs, targets, components, weights) -> {name: loss}, for
      losses that ride on another task (UNITER's WRA with ITM).
    default_loss_weights: weights other than 1 (an extra loss's included).
    image_qa: the design can read the vqa table's answers (`data.qa`).
  """
  components: tuple[str, ...]
  default_tasks: tuple[str, ...]
  mix: str
  mask_regions: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array] | None
  default_ratios: tuple[float, ...] = ()
  random_token_min: int = 0
  conditional_masking: bool = False
  at_least_one: bool = False
  skip_first_region: bool = False
  positives_only: bool = False
  extra_losses: Callable[..., dict[str, jax.Array]] | None = None
  default_loss_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
  image_qa: bool = False

  @property
  def loss_names(self) -> tuple[str, ...]:
    """The components and the extra losses (those with a default weight)."""
    return self.components + tuple(k for k in self.default_loss_weights
                                   if k not in self.components)


@dataclasses.dataclass(frozen=True)
class Design:
  """A fusion design's answers (see the module docstring).

  Attributes:
    name: the `config.model.name`.
    model: the backbone module class; `pretraining`: backbone + pretraining heads.
    location_features: normalised boxes [B, S, 4] (x1/W, y1/H, x2/W, y2/H) ->
      the design's location features [B, S, loc_dim] (numpy).
    loc_dim: width of `location_features`.
    leading_slots: region slots before the detector regions (ViLBERT's [IMG]).
    fill_leading_slots: (feats [B, S, F], loc [B, S, L], mask [B, S] bool,
      count [B]) -> None, writing the leading slots in place.
    needs_class_probs: the pretraining objectives read the detector's class
      distributions.
    matched_label: `match_label` of a matched pair (a mismatched one: 1 - it).
    matching_head: param name (beside 'backbone') of the pretraining module's
      2-way image-text matching head, whose `matched_label` column scores a
      matched pair (retrieval starts its score head from it).
    mlm_head: param name (beside 'backbone') of the pretraining module's MLM
      head (captioning starts its LM head from it).
    pairing: how a mismatched pair is made (PAIRINGS).
    max_text_len: the original's text length (word pieces incl. [CLS]/[SEP]).
    world_text_len: the text length on the embedded world (its sentences are short).
    world_pretrain: `config.pretrain` fields a `small` run on the embedded world
      overrides: the recipe rebalanced so that every objective leaves its
      plateau within the world's budget (config_lib.SMALL_RUN).
    recipe: the pretraining recipe.
    forward_flops: (model config, text_len, regions, mlm_predictions,
      components=None) -> forward FLOPs of one pretraining example: the
      backbone and the heads of the loss `components` (None: every head).
    optimizer: the published pretraining optimiser (`config.train` fields).
    decays: a parameter path (tuple of names) -> whether weight decay applies,
      as the original's rule.
    bert_text_paths: model config -> where BERT's text weights live.
    pair_image_token_types: the token types of a two-image example's left and
      right regions, passed to the backbone as `visual_token_type_ids` [B, R]
      (NLVR2: UNITER's `img_type_ids` 1 and 2, VisualBERT's 0 and 1); None:
      the backbone takes no region token types.
    after_bert_import: (backbone params, model config) -> params, run after
      BERT's text weights are loaded (VisualBERT copies them into its region
      tables).
  """
  name: str
  model: type[nn.Module]
  pretraining: type[nn.Module]
  location_features: Callable[[np.ndarray], np.ndarray]
  loc_dim: int
  matched_label: int
  pairing: str
  max_text_len: int
  world_text_len: int
  recipe: PretrainingRecipe
  forward_flops: Callable[..., float]
  optimizer: Mapping[str, Any]
  decays: Callable[[tuple[str, ...]], bool]
  bert_text_paths: Callable[[ml_collections.ConfigDict], dict[str, Any]]
  needs_class_probs: bool = False
  leading_slots: int = 0
  fill_leading_slots: Callable[..., None] | None = None
  after_bert_import: Callable[[Any, ml_collections.ConfigDict], Any] | None = None
  matching_head: str | None = None
  mlm_head: str = 'mlm'
  pair_image_token_types: tuple[int, int] | None = None
  world_pretrain: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.pairing not in PAIRINGS:
      raise ValueError(f'{self.name}: pairing must be one of {PAIRINGS}, got {self.pairing!r}')

  def is_matched(self, match_label: jax.Array) -> jax.Array:
    """[B] labels in this design's convention -> [B] bool, True for matching pairs."""
    return match_label == self.matched_label


def get_design(name: str) -> Design:
  """The `DESIGN` of `vlpjax.models.<name>`.

  Raises:
    ValueError: `name` is not one of DESIGNS.
  """
  if name not in DESIGNS:
    raise ValueError(f'config.model.name must be one of {DESIGNS}, got {name!r}')
  return importlib.import_module(f'vlpjax.models.{name}').DESIGN


def as_design(design: str | Design) -> Design:
  """`design` itself, or the design of that name."""
  return design if isinstance(design, Design) else get_design(design)


def bert_decays(path: tuple[str, ...]) -> bool:
  """BERT's rule (LXMERT): no decay on biases and LayerNorm scales."""
  return path[-1] not in ('bias', 'scale')


def no_bias_name_decays(path: tuple[str, ...]) -> bool:
  """The rule `any(nd in name for nd in ['bias', 'LayerNorm.bias',
  'LayerNorm.weight'])` of UNITER, ViLBERT and VisualBERT: no decay on any
  parameter whose name contains 'bias' (UNITER's `mrfr_bias` too) or on
  LayerNorm scales."""
  return not any('bias' in name for name in path) and path[-1] != 'scale'
