"""SNLI-VE (visual entailment): does the image entail a statement, leave it
open, or contradict it?

Shared TASKS.md "SNLI-VE": a 3-way head on each design's backbone, scored by
accuracy. The model, the batches' text and regions, the evaluation batches
and the prediction step are `vlpjax.tasks.vqa`'s, with the three labels as the
"answers" (`LABELS`, in `world.ENTAILMENT_LABELS`' order, which the tables'
`label` ids follow).

Heads (`HEADS` per design; `config.snli_ve.head` overrides, `vqa.VqaModel` kinds):
  'pooled_mlp'     UNITER (TASKS.md: its VQA MLP with 3 outputs), and LXMERT and
                   VisualBERT, on which TASKS.md is silent: pooled [B, P] ->
                   Linear(P, 2P) -> GELU -> LayerNorm -> Linear(2P, 3).
  'pooled_linear'  ViLBERT (TASKS.md: Linear(1024, 3) on its pooled output,
                   which is already text_pooled * image_pooled): dropout ->
                   Linear(P, 3), as vilbert-multi-task's `vil_tri_prediction`.
Losses (`LOSSES` per design; `config.snli_ve.loss` overrides):
  'bce'  UNITER: BCE-with-logits against the one-hot label, summed over the 3
         outputs ("BCE x 3": VQA's instance-level BCE, `vqa.bce_loss`).
  'ce'   the others: softmax cross-entropy with the gold label (computed as
         `vqa.kl_loss`, which on a one-hot target is exactly the CE).

The snli_ve table (`data.snli_ve_dataset`, e.g. 'snli_ve/flickr30k' of
`annotations_builder.SnliVe`; by default the embedded world's `<size>_snli_ve`):
pair_id (text, SNLI-VE's pairID), text (the statement), image_index, image_id,
label int32 into LABELS.

Batches (`SnliVeExamples`): input_ids, text_mask, token_type_ids int32 [B, T];
answer_slot int32 [B] (zeros: no head reads it); region_feats [B, R, F],
region_loc float32 [B, R, L], region_mask int32 [B, R]; answer_scores float32
[B, 3], the one-hot gold label.

Evaluation (`SnliVeEvaluator`, evaluators of type 'snli_ve'): every pair once
(the last batch padded and masked), `accuracy` (correct / count, summed over
processes) and `count`; predictions go to `predictions/<name>_step<N>.json`, a
JSON list in split order of {"pair_id": str, "label": str} (the label's name,
e.g. "entailment"), written in parts and merged by process 0.

Recipes at `base`: TASKS.md names none for SNLI-VE (UNITER's VE config is not
in it either), so each design fine-tunes with its VQA recipe and question
length (`vqa.RECIPES`, `vqa.TEXT_LENGTHS`); the embedded world with VQA's
world recipe.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlpjax.data import examples as examples_lib
from vlpjax.data import input_pipeline, tables
from vlpjax.data import world as world_lib
from vlpjax.objectives.common import ratio
from vlpjax.tasks import gqa, vqa

TABLE = 'snli_ve'
EVAL_TYPE = 'snli_ve'
# The metric of the `snli_ve_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'accuracy'
LABELS = world_lib.ENTAILMENT_LABELS
# The table's fields a batch is made of.
PAIR_KEYS = ('pair_id', 'text', 'image_index', 'label')

HEAD_KINDS = ('pooled_mlp', 'pooled_linear')
HEADS = {'uniter': 'pooled_mlp', 'vilbert': 'pooled_linear', 'lxmert': 'pooled_mlp',
         'visualbert': 'pooled_mlp'}
LOSS_KINDS = ('bce', 'ce')
LOSSES = {'uniter': 'bce', 'vilbert': 'ce', 'lxmert': 'ce', 'visualbert': 'ce'}
# `vqa.vqa_loss` kind of each loss: KL to a one-hot target is the cross-entropy.
_VQA_LOSS = {'bce': 'bce', 'ce': 'kl'}
# TASKS.md names no SNLI-VE recipe: each design's VQA recipe.
RECIPES = vqa.RECIPES


def default_snli_ve_config() -> ml_collections.ConfigDict:
  """The `config.snli_ve` section (None: the design's default)."""
  return ml_collections.ConfigDict(dict(
      train_split='train',
      head=ml_collections.config_dict.placeholder(str),  # HEAD_KINDS; None: HEADS[design]
      loss=ml_collections.config_dict.placeholder(str),  # LOSS_KINDS; None: LOSSES[design]
      dropout_rate=ml_collections.config_dict.placeholder(float),  # None: model.dropout_rate
  ))


def resolve_head(config: ml_collections.ConfigDict) -> str:
  """`config.snli_ve.head`, or the design's (HEADS)."""
  design = config.model.name
  if design not in HEADS:
    raise ValueError(f'unknown design {design!r}; expected one of {tuple(HEADS)}')
  head = config.snli_ve.head
  return vqa.choose('snli_ve.head', HEADS[design] if head is None else head, HEAD_KINDS)


def resolve_loss(config: ml_collections.ConfigDict) -> str:
  """`config.snli_ve.loss`, or the design's (LOSSES)."""
  loss = config.snli_ve.loss
  return vqa.choose('snli_ve.loss', LOSSES[config.model.name] if loss is None else loss, LOSS_KINDS)


# ----------------------------------------------------------------------------
# Examples.


def one_hot_labels(labels: np.ndarray, pair_ids: Sequence[str]) -> np.ndarray:
  """Label ids [B] -> float32 [B, len(LABELS)]; an id outside LABELS is an
  error naming its pair."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  outside = (labels < 0) | (labels >= len(LABELS))
  if outside.any():
    row = int(np.flatnonzero(outside)[0])
    raise ValueError(f'pair {pair_ids[row]}: label {labels[row]} is not an index into {LABELS}')
  return np.eye(len(LABELS), dtype=np.float32)[labels]


class SnliVeExamples(vqa.PairExamples):
  """Builds SNLI-VE batches (module docstring) from the tables (`vqa.PairExamples`;
  `pairs`: the snli_ve table, PAIR_KEYS)."""

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The batch of snli_ve records `indices` [B]."""
    records = self.pairs.read(np.asarray(indices, np.int64).reshape(-1))
    batch = vqa.encode_questions(self.tokenizer, [tables.as_text(r['text']) for r in records],
                                 append_mask_slot=False)
    image_index = np.array([r['image_index'] for r in records], np.int64).reshape(-1)
    regions = examples_lib.region_batch(self.design, self.images, image_index)
    batch.update({k: regions[k] for k in vqa.REGION_KEYS})
    batch['answer_scores'] = one_hot_labels(
        np.array([r['label'] for r in records]), [tables.as_text(r['pair_id']) for r in records])
    return batch


def open_examples(data_config: ml_collections.ConfigDict, design: str, split: str
                  ) -> SnliVeExamples:
  """The examples of a split of the snli_ve table for `design`."""
  return SnliVeExamples(design, *vqa.open_text_inputs(data_config, design, TABLE, split,
                                                      PAIR_KEYS))


def read_labels(pairs: tables.Table, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(pair ids, object (str) array [N]; label ids, int64 [N]) in row order."""
  records = tables.read_all(pairs, chunk)
  return (np.array([tables.as_text(r['pair_id']) for r in records], object),
          np.array([r['label'] for r in records], np.int64).reshape(-1))


# ----------------------------------------------------------------------------
# Evaluation: pure functions.


def accuracy_stats(predicted_labels: Sequence[str], gold_labels: Sequence[str]
                   ) -> dict[str, np.int64]:
  """Sufficient statistics of accuracy over a set of pairs: {'correct',
  'count'} int64 (sum them over processes with `evaluators.common.process_sum`)."""
  if len(predicted_labels) != len(gold_labels):
    raise ValueError(f'{len(predicted_labels)} predictions but {len(gold_labels)} labels')
  unknown = sorted({str(l) for l in gold_labels if l not in LABELS})
  if unknown:
    raise ValueError(f'gold labels {unknown} are not in {LABELS}')
  return {'correct': np.int64(sum(p == g for p, g in zip(predicted_labels, gold_labels))),
          'count': np.int64(len(gold_labels))}


# `accuracy` (correct / count, a fraction; NaN over no pairs) and `count`, as GQA's.
summary = gqa.summary


def prediction_records(pair_ids: Sequence[str], predicted_labels: Sequence[str]
                       ) -> list[dict[str, str]]:
  """The prediction file's format: [{"pair_id": str, "label": str}]."""
  if len(pair_ids) != len(predicted_labels):
    raise ValueError(f'{len(pair_ids)} pair ids but {len(predicted_labels)} labels')
  return [{'pair_id': str(p), 'label': str(l)} for p, l in zip(pair_ids, predicted_labels)]


class SnliVeEvaluator(vqa.SplitEvaluator):
  """Accuracy on a split of the snli_ve table, and its prediction file.

  Every pair is scored once (`vqa.gather_predictions`: the last batch padded
  and masked); the statistics are summed over processes; predictions go to
  `<workdir>/predictions/<name>_step<N>.json` (`prediction_records`), written
  in parts and merged by process 0.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: vqa.VqaModel, mesh: Mesh,
               workdir: str):
    super().__init__(name, eval_config, config, mesh, workdir)
    self.examples = open_examples(config.data, config.model.name, eval_config.split)
    self.pair_ids, label_ids = read_labels(self.examples.pairs)
    self.gold_labels = np.array([LABELS[int(i)] for i in label_ids], object)
    self._predict = vqa.prediction_step(model, self.sharding)

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): accuracy and count."""
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    index, predicted, records = vqa.gather_predictions(
        self._predict, params, self.examples, LABELS, self.batch_size, self.sharding,
        self.pair_ids, prediction_records)
    stats = common.process_sum(accuracy_stats(predicted, list(self.gold_labels[index])))
    common.write_prediction_parts(self.prediction_path(step), records)
    yield from summary(stats).items()


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`).

objective_for_step = vqa.objective_for_step
make_inputs = vqa.make_inputs  # model kwargs and the one-hot `answer_scores`, weight 1
flops_per_example = vqa.flops_per_example


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` an SNLI-VE run: `config.snli_ve`, `data.snli_ve_dataset`,
  the design's VQA recipe and question length (the world's for 'small'/'tiny'),
  evaluators of type 'snli_ve' on validation (every 200 steps on the world,
  5,000 at base) and test (at the end)."""
  vqa.configure_finetuning(config, size, 'snli_ve', default_snli_ve_config(), RECIPES)
  config.data.snli_ve_dataset = ml_collections.config_dict.placeholder(str)


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the model against the data and the `config.snli_ve` choices."""
  vqa.check_model_against_data(config)
  resolve_head(config)
  resolve_loss(config)
  return config


def make_model(config: ml_collections.ConfigDict) -> vqa.VqaModel:
  """The design's backbone with its 3-way head (`resolve_head`)."""
  return vqa.build_model(config.model, len(LABELS), head=resolve_head(config),
                         dropout_rate=config.snli_ve.dropout_rate)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable batches of the snli_ve table's `config.snli_ve.train_split`."""
  split = config.snli_ve.train_split
  examples = open_examples(config.data, config.model.name, split)
  return vqa.task_train_iterator(config, mesh, examples, split, TABLE, head=resolve_head(config))


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """One compiled step: the entailment loss."""
  del config
  return ['snli_ve']


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, jax.Array], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The design's loss (`resolve_loss`) and the batch's accuracy."""
  del objective
  kind = resolve_loss(config)
  logits, one_hot, weights = outputs['logits'], targets['answer_scores'], targets['weights']
  loss = vqa.vqa_loss(_VQA_LOSS[kind], logits, one_hot, weights)
  correct = (vqa.predict(logits) == jnp.argmax(one_hot, axis=-1)).astype(jnp.float32)
  accuracy = ratio(jnp.sum(correct * weights), jnp.maximum(jnp.sum(weights), 1.0))
  return loss, {kind: loss, 'train_accuracy': accuracy}


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """The labels, one a line, as `vqa.VqaPredictor` reads its answers."""
  del config
  return {vqa.ANSWERS_FILE: list(LABELS)}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> Mapping[str, Any]:
  """The 3-way head starts fresh (no pretraining head predicts these labels)."""
  del config, abstract_params
  return params


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None
              ) -> vqa.VqaPredictor:
  """`vlpjax.load`'s object: `answer(statements, features, boxes, image_size)`
  gives each statement's label name about one image."""
  return vqa.VqaPredictor(config, workdir, step, head=resolve_head(config))


def make_evaluators(config: ml_collections.ConfigDict, model: vqa.VqaModel, mesh: Mesh,
                    workdir: str) -> list[SnliVeEvaluator]:
  """The `config.evals` entries (all of type 'snli_ve')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'snli_ve', {EVAL_TYPE: SnliVeEvaluator}, model, mesh,
                                 workdir)
