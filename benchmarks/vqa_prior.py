r"""Does a VQA run beat the answer prior? Per answer type (and per question type
where the table stores one) on a split of the run's tables:

- the run's official accuracy;
- the prior: the official accuracy of the constant answer of each question's
  answer type, the answer most often given by the annotators' majority on the
  training split;
- how often the run answers that constant;
- for yes/no questions, the ROC AUC of logit(yes) - logit(no) against the
  annotators' majority: 0.5 means the run cannot tell them apart, whatever its
  accuracy; 1.0 means it ranks every "yes" above every "no" (None where a group
  holds one of the two only).

  python -m benchmarks.vqa_prior --workdirs=DIR[,DIR...] [--split=test]
      [--batch_size=128] [--out=benchmarks/results/vqa_prior.json]   (from the repo root)

A workdir is a VQA run of `vlpjax.main` (`vlpjax.load` reads it; its newest
checkpoint). The split must have ground-truth answers (the embedded world's
test split has them; VQA v2's test split does not).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

import vlpjax
from vlpjax.data import tables
from vlpjax.tasks import vqa, vqa_accuracy

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'vqa_prior.json')
TRAIN_SPLIT = 'train'


def majority_answer(answers: Sequence[str]) -> str:
  """The annotators' most common answer after the official normalisation (ties:
  the first given)."""
  return collections.Counter(vqa_accuracy.normalize_answer(a) for a in answers
                             ).most_common(1)[0][0]


def roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
  """The probability that a positive scores above a negative (ties count half):
  is_positive bool [N], scores [N]. NaN without both classes."""
  is_positive, scores = np.asarray(is_positive, bool), np.asarray(scores, np.float64)
  num_positive, num_negative = int(is_positive.sum()), int((~is_positive).sum())
  if not num_positive or not num_negative:
    return float('nan')
  # Mann-Whitney U from average ranks: O(N log N), where pairs would not fit
  # VQA v2's yes/no questions in memory.
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties share one
  above = average_rank[inverse][is_positive].sum() - num_positive * (num_positive + 1) / 2
  return float(above / (num_positive * num_negative))


def constant_answers(truth: Mapping[int, vqa.GroundTruth]) -> dict[str, str]:
  """answer type -> the answer most often the majority among `truth`'s questions."""
  counts = collections.defaultdict(collections.Counter)
  for gt in truth.values():
    if gt.answers:
      counts[gt.answer_type][majority_answer(gt.answers)] += 1
  return {answer_type: c.most_common(1)[0][0] for answer_type, c in counts.items()}


def question_types(data_config: Any, split: str) -> dict[int, str] | None:
  """question_id -> question_type, or None if the vqa table stores no types."""
  if 'question_type' not in tables.open_table(data_config, 'vqa', split).dataset_info.features:
    return None
  table = tables.open_split(data_config, 'vqa', split, ('question_id', 'question_type'))
  return {int(r['question_id']): tables.as_text(r['question_type'])
          for r in tables.read_all(table)}


def analyse(workdir: str, split: str, batch_size: int) -> dict[str, Any]:
  """The figures of the module docstring for one VQA run."""
  model = vlpjax.load(workdir)
  config = model.config
  examples, answers = vqa.open_examples(
      config.data, config.model.name, split=split, head=model.head,
      answer_vocab_file=config.vqa.answer_vocab_file)
  if list(answers) != list(model.answers):
    raise ValueError(f'{workdir}: the answers of its tables differ from its answers.txt')
  truth = vqa.read_ground_truth(vqa.open_questions(config.data, split, with_ground_truth=True))
  if not any(gt.answers for gt in truth.values()):
    raise ValueError(f'split {split!r} has no ground-truth answers to compare with')
  constants = constant_answers(vqa.read_ground_truth(
      vqa.open_questions(config.data, TRAIN_SPLIT, with_ground_truth=True)))
  kinds = question_types(config.data, split)
  yes, no = (model.answers.index(a) if a in model.answers else None for a in ('yes', 'no'))

  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for start in range(0, len(examples), batch_size):
    batch = examples.examples(range(start, min(start + batch_size, len(examples))))
    logits = model.logits(batch)
    predicted = vqa.answer_strings(np.argmax(logits, -1), model.answers)
    for question_id, answer, row in zip(batch['question_id'], predicted, logits):
      gt = truth[int(question_id)]
      if not gt.answers:
        continue
      constant = constants.get(gt.answer_type)
      entry = dict(accuracy=vqa_accuracy.question_accuracy(answer, gt.answers),
                   prior=(vqa_accuracy.question_accuracy(constant, gt.answers)
                          if constant is not None else float('nan')),
                   gives_prior=float(vqa_accuracy.normalize_answer(answer) == constant))
      if gt.answer_type == 'yes/no' and yes is not None and no is not None:
        entry.update(majority_yes=majority_answer(gt.answers) == 'yes',
                     yes_margin=float(row[yes] - row[no]))
      names = [f'answer_type/{gt.answer_type}']
      if kinds is not None:
        names.append(f'question_type/{kinds[int(question_id)]}')
      for name in ('all', *names):
        for key, value in entry.items():
          groups[name][key].append(value)

  figures = {}
  for name, values in sorted(groups.items()):
    figures[name] = dict(count=len(values['accuracy']),
                         accuracy=float(np.mean(values['accuracy'])),
                         prior=float(np.mean(values['prior'])),
                         gives_prior=float(np.mean(values['gives_prior'])))
    if values.get('yes_margin'):
      auc = roc_auc(np.array(values['majority_yes']), np.array(values['yes_margin']))
      figures[name]['yes_no_auc'] = auc if np.isfinite(auc) else None  # one class only
  return dict(workdir=workdir, step=model.step, split=split, constant_answers=constants,
              figures=figures)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdirs', required=True, help='comma-separated VQA run workdirs')
  parser.add_argument('--split', default='test')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--out', default=RESULTS)
  args = parser.parse_args(argv)
  runs = [analyse(w, args.split, args.batch_size) for w in args.workdirs.split(',') if w]
  for run in runs:
    print(f"{run['workdir']} (step {run['step']}, {run['split']}; constant answers "
          f"{run['constant_answers']}):")
    for name, f in run['figures'].items():
      auc = '' if 'yes_no_auc' not in f else (
          f" | yes/no AUC {f['yes_no_auc']:.3f}" if f['yes_no_auc'] is not None
          else ' | yes/no AUC n/a (one class)')
      print(f"  {name:32s} n={f['count']:5d} | accuracy {f['accuracy']:.3f} | prior "
            f"{f['prior']:.3f} | gives the prior {f['gives_prior']:.1%}{auc}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(runs, f, indent=1)
  print(f'wrote {args.out}')
  return dict(runs=runs)


if __name__ == '__main__':
  main()
