"""The official VQA v2 accuracy (GT-Vision-Lab/VQA `vqaEval.py`), in plain Python.

Per question: answers are stripped of newlines/tabs (replaced by spaces) and
surrounding whitespace; if the ground-truth answers are not all identical, the
prediction and every ground truth are then normalised (`normalize_answer`).
The accuracy is, averaged over the ground truths, `min(1, m / 3)` where `m`
counts how many of the *other* ground truths equal the prediction
(leave-one-out). With 10 answers: 0, 0.3, 0.6, 0.9, 1.0 when 0, 1, 2, 3, >= 4
annotators gave the prediction.

Accuracies here are fractions in [0, 1] at full precision (the official
script prints percentages rounded to 2 decimals).

The official script's quirks are kept on purpose, so that numbers match it:
  * no normalisation at all (not even lowercasing) when the ground truths are
    all identical after the strip: 'two' against ten '2' scores 0;
  * punctuation is deleted, rather than replaced by a space, when it is next
    to a space anywhere in the answer, or when the answer has a comma between
    two digits anywhere ('red-white 1,5' -> 'redwhite 15');
  * the period rule is "a period not followed by a digit" (the official regex
    meant a look-behind but wrote `(?!<=\\d)`, a look-ahead), and at most 32
    periods are removed (`re.UNICODE` is passed as `count`);
  * words are lowercased before the contraction table is looked up, so its
    capitalised keys ('Im', 'Ive', "I'dve", ...) never apply;
  * "somebody'd" -> 'somebodyd' (the table has that entry backwards).

Sufficient statistics (`compute_stats`) are per answer type sums of accuracies
and counts: arrays of fixed shape that several processes can simply add.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

ANSWER_TYPES = ('yes/no', 'number', 'other')

# vqaEval.py `self.punct`: note '.', "'", ':' and others are not in it.
_PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-',
                '>', '<', '@', '`', ',', '?', '!')
# A comma between two digits ('1,000'): anywhere in the answer, it switches every
# punctuation mark to deletion.
_COMMA_BETWEEN_DIGITS = re.compile(r'\d,\d')
# A period not followed by a digit (what the official `(?!<=\d)(\.)(?!\d)` does).
_PERIOD = re.compile(r'\.(?!\d)')
_MAX_PERIODS_REMOVED = 32  # int(re.UNICODE), passed as `count` by vqaEval.py.

_NUMBER_WORDS = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
    'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10',
}
_ARTICLES = frozenset({'a', 'an', 'the'})
# vqaEval.py `self.contractions`, all 120 entries as they are (the capitalised
# keys cannot match a lowercased word; "somebody'd" maps to 'somebodyd').
_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've",
    'couldnt': "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    'hes': "he's", 'howd': "how'd", 'howll': "how'll", 'hows': "how's",
    "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't",
    'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll",
    "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're",
    'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're",
    'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's",
    'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's",
    'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're",
    'youve': "you've",
}


def strip_answer(answer: str) -> str:
  """Newlines and tabs -> spaces, then surrounding whitespace removed."""
  return answer.replace('\n', ' ').replace('\t', ' ').strip()


def process_punctuation(text: str) -> str:
  """The official punctuation rule (see the module docstring for its quirks)."""
  delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
  out = text
  for mark in _PUNCTUATION:
    # The test looks at the input, not at the partly processed `out`.
    delete = delete_all or mark + ' ' in text or ' ' + mark in text
    out = out.replace(mark, '' if delete else ' ')
  return _PERIOD.sub('', out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
  """Per word: lowercase, number words -> digits, drop articles, fix contractions."""
  words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
  return ' '.join(_CONTRACTIONS.get(word, word) for word in words
                  if word not in _ARTICLES)


def normalize_answer(answer: str) -> str:
  """The full normalisation applied when the ground truths differ."""
  return process_digit_article(process_punctuation(strip_answer(answer)))


def question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
  """The official accuracy of one prediction against its ground-truth answers.

  Any number >= 1 of ground truths works as in the official code (a single one
  has no others to match, so it always scores 0).
  """
  if not gt_answers:
    raise ValueError('question_accuracy needs at least one ground-truth answer')
  gts = [strip_answer(answer) for answer in gt_answers]
  prediction = strip_answer(prediction)
  if len(set(gts)) > 1:
    gts = [process_digit_article(process_punctuation(answer)) for answer in gts]
    prediction = process_digit_article(process_punctuation(prediction))
  total_matches = sum(answer == prediction for answer in gts)
  # Leave-one-out: gt i sees the matches among the others.
  per_gt = [min(1.0, (total_matches - (answer == prediction)) / 3) for answer in gts]
  return sum(per_gt) / len(per_gt)


def zero_stats() -> dict[str, np.ndarray]:
  """Empty statistics: per answer type (`ANSWER_TYPES` order) sums and counts."""
  return {'accuracy_sum': np.zeros(len(ANSWER_TYPES), np.float64),
          'count': np.zeros(len(ANSWER_TYPES), np.int64)}


def compute_stats(predictions: Iterable[str], gt_answers: Iterable[Sequence[str]],
                  answer_types: Iterable[str]) -> dict[str, np.ndarray]:
  """Sufficient statistics of a set of questions (one entry each, in step)."""
  stats = zero_stats()
  predictions, gt_answers, answer_types = list(predictions), list(gt_answers), list(
      answer_types)
  if not len(predictions) == len(gt_answers) == len(answer_types):
    raise ValueError(f'lengths differ: {len(predictions)} predictions, '
                     f'{len(gt_answers)} answer lists, {len(answer_types)} answer types')
  for prediction, answers, answer_type in zip(predictions, gt_answers, answer_types):
    if answer_type not in ANSWER_TYPES:
      raise ValueError(f'unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES}')
    index = ANSWER_TYPES.index(answer_type)
    stats['accuracy_sum'][index] += question_accuracy(prediction, answers)
    stats['count'][index] += 1
  return stats


def merge_stats(*stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The statistics of the union of disjoint sets of questions: element-wise sums."""
  merged = zero_stats()
  for part in stats:
    for key in merged:
      merged[key] = merged[key] + np.asarray(part[key])
  return merged


def summary(stats: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Fractions in [0, 1]: `accuracy` (the mean over all questions, as the official
  'overall'), `accuracy_yes_no`, `accuracy_number`, `accuracy_other`; `count` and
  `count_<type>`. An accuracy over no questions is NaN."""
  sums = np.asarray(stats['accuracy_sum'], np.float64)
  counts = np.asarray(stats['count'], np.int64)

  def mean(total: float, count: int) -> float:
    return float(total) / int(count) if count else float('nan')

  result = {'accuracy': mean(sums.sum(), counts.sum()), 'count': int(counts.sum())}
  for index, answer_type in enumerate(ANSWER_TYPES):
    name = answer_type.replace('/', '_')
    result[f'accuracy_{name}'] = mean(sums[index], counts[index])
    result[f'count_{name}'] = int(counts[index])
  return result
