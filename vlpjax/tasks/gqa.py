"""GQA: VQA's model on the gqa table, scored by exact match, with the submission file.

Shared TASKS.md "GQA": head and loss as VQA, metric exact-match accuracy,
submission `[{"questionId": str, "prediction": str}]`. So everything but the
table and the evaluator is `vlpjax.tasks.vqa`'s, called here: each design's VQA
head and loss (the same alternatives, `vqa.HEADS`), the question batches
(`VqaExamples`), the resumable iterator, the head's start from LXMERT's
pretraining QA head, and `vlpjax.load`'s predictor (`VqaPredictor`, which reads
the workdir's `answers.txt`, not the table).

The config section is `config.vqa`, not a `config.gqa` copy of it: its fields
(head, loss, answer_vocab_file, dropout_rate, head_from_pretraining,
train_split) mean for GQA exactly what they mean for VQA, so VQA's interface
functions serve GQA told only the table, and a copy would make every one of them
take the section as an argument. `--config.vqa.answer_vocab_file=
.../trainval_ans2label.json` gives LXMERT's 1,842 answers (labels matched by
string).

The gqa table (`data.gqa_dataset`, e.g. 'gqa/balanced' of
`annotations_builder.Gqa`; by default the embedded world's `<size>_gqa`) has
the vqa table's QUESTION_KEYS: question_id (text: GQA's ids, e.g. '02930152'),
question, image_index, answer_labels [K] and answer_scores [K] (K = 1, score
1.0, when the answer is in the table's vocabulary, else 0), plus image_id and
answer (the string, '' when unknown: the submission questions), and its
`answers.txt`.

Metric: the prediction string equal to the answer string, as GQA's `eval.py`
compares them (no normalisation; TASKS.md names none): exact-match accuracy
over the questions with an answer; the others get predictions only.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlpjax.data import input_pipeline, tables
from vlpjax.tasks import vqa

TABLE = 'gqa'
EVAL_TYPE = 'gqa'
# The metric of the `gqa_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'accuracy'

# Published fine-tuning recipes at `base` (TASKS.md), as `config.train` fields.
RECIPES = {
    # TASKS.md is silent on the GQA recipes of UNITER, VisualBERT and ViLBERT:
    # their VQA recipes.
    **vqa.RECIPES,
    # TASKS.md: batch 32, lr 1e-5, 4 epochs. LXMERT trains on train + valid (the
    # balanced train's 943,000 and val's 132,062 questions, GQA's published
    # sizes, not TASKS.md's): 134,383 steps; warmup and clipping as its VQA recipe.
    'lxmert': dict(vqa.RECIPES['lxmert'], learning_rate=1e-5, num_steps=134_383),
}
# Question lengths: VQA's (`vqa.TEXT_LENGTHS`, set by `vqa.configure`): LXMERT's
# MAX_GQA_LENGTH is its MAX_VQA_LENGTH, 20; TASKS.md is silent on the others.


# ----------------------------------------------------------------------------
# Evaluation: pure functions.


def exact_match_stats(predicted_answers: Sequence[str], true_answers: Sequence[str]
                      ) -> dict[str, np.int64]:
  """Exact-match sufficient statistics of a set of questions (in step):
  {'correct', 'count'} int64 over the questions with a true answer ('' = none);
  sum them over processes (`evaluators.common.process_sum`)."""
  if len(predicted_answers) != len(true_answers):
    raise ValueError(f'{len(predicted_answers)} predictions but {len(true_answers)} answers')
  answered = [(p, t) for p, t in zip(predicted_answers, true_answers) if t]
  return {'correct': np.int64(sum(p == t for p, t in answered)),
          'count': np.int64(len(answered))}


def summary(stats: Mapping[str, Any]) -> dict[str, float]:
  """`accuracy` (correct / count, a fraction; NaN over no questions) and `count`."""
  count = int(stats['count'])
  return {'accuracy': int(stats['correct']) / count if count else float('nan'),
          'count': count}


def submission_records(question_ids: Sequence[str], answers: Sequence[str]
                       ) -> list[dict[str, str]]:
  """The GQA submission format: [{"questionId": str, "prediction": str}]."""
  if len(question_ids) != len(answers):
    raise ValueError(f'{len(question_ids)} question ids but {len(answers)} answers')
  return [{'questionId': str(q), 'prediction': str(a)} for q, a in zip(question_ids, answers)]


def read_answers(data_config: ml_collections.ConfigDict, split: str, chunk: int = 4096
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(question ids, true answers) of the gqa table's `split`, both object (str)
  arrays [N] in row order ('' where a question has no answer)."""
  records = tables.read_all(
      tables.open_split(data_config, TABLE, split, ('question_id', 'answer')), chunk)
  return (np.array([tables.as_text(r['question_id']) for r in records], object),
          np.array([tables.as_text(r['answer']) for r in records], object))


class GqaEvaluator(vqa.SplitEvaluator):
  """Exact-match accuracy on a split of the gqa table, and its submission file.

  Every question is answered once (`vqa.predicted_answers`: the last batch
  padded and masked); the statistics are summed over processes; predictions go
  to `<workdir>/predictions/<name>_step<N>.json` (`submission_records`), written
  in parts and merged by process 0.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: vqa.VqaModel, mesh: Mesh,
               workdir: str):
    super().__init__(name, eval_config, config, mesh, workdir)
    self.examples, self.answers = vqa.open_examples(
        config.data, config.model.name, split=eval_config.split, head=config.vqa.head,
        answer_vocab_file=config.vqa.answer_vocab_file, with_question_id=False, table=TABLE)
    self.question_ids, self.true_answers = read_answers(config.data, eval_config.split)
    self._answer = vqa.prediction_step(model, self.sharding)

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): accuracy and count."""
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    index, predicted, records = vqa.gather_predictions(
        self._answer, params, self.examples, self.answers, self.batch_size, self.sharding,
        self.question_ids, submission_records)
    stats = common.process_sum(exact_match_stats(predicted, list(self.true_answers[index])))
    common.write_prediction_parts(self.prediction_path(step), records)
    yield from summary(stats).items()


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`): VQA's, on the gqa table.

prepare = vqa.prepare
objectives = vqa.objectives
objective_for_step = vqa.objective_for_step
make_inputs = vqa.make_inputs
compute_losses = vqa.compute_losses
flops_per_example = vqa.flops_per_example
predictor = vqa.predictor


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` a GQA run: VQA's `configure` (`config.vqa`, question length,
  checkpoints, the embedded world's recipe for 'small'/'tiny'), then the
  design's GQA recipe and evaluators of type 'gqa': testdev (every 5,000 steps)
  and the submission questions (at the end); on the world, which has no
  testdev, validation (every 200 steps) and test."""
  from vlpjax import config_lib  # pylint: disable=g-import-not-at-top
  vqa.configure(config, size)
  config.task = 'gqa'
  world = size in config_lib.WORLD_SIZES
  if not world:
    config.train.update(RECIPES[config.model.name])
  batch = vqa.WORLD_EVAL_BATCH if world else 512
  first, first_split = ('gqa_val', 'validation') if world else ('gqa_testdev', 'testdev')
  config.evals = ml_collections.ConfigDict({
      first: dict(type=EVAL_TYPE, split=first_split, batch_size=batch,
                  log_steps=200 if world else 5_000),
      'gqa_test': dict(type=EVAL_TYPE, split='test', batch_size=batch,
                       log_steps=config.train.num_steps)})


def make_model(config: ml_collections.ConfigDict) -> vqa.VqaModel:
  """The design's backbone with its VQA head over the gqa answer vocabulary."""
  return vqa.make_model(config, TABLE)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable batches of the gqa table's `config.vqa.train_split`."""
  return vqa.make_train_iterator(config, mesh, TABLE)


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """The answer vocabulary, one a line (`load` reads it back)."""
  return vqa.inference_files(config, TABLE)


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> dict[str, Any]:
  """VQA's: the 'pooled_mlp' head from an `init.source` run's QA head, answers
  matched by string to the gqa vocabulary."""
  return vqa.init_heads(config, params, abstract_params, TABLE)


def make_evaluators(config: ml_collections.ConfigDict, model: vqa.VqaModel, mesh: Mesh,
                    workdir: str) -> list[GqaEvaluator]:
  """The `config.evals` entries (all of type 'gqa')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'gqa', {EVAL_TYPE: GqaEvaluator}, model, mesh,
                                 workdir)
