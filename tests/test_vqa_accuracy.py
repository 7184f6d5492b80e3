"""The official VQA v2 accuracy on hand-made edge cases (expected values by hand)."""
from fractions import Fraction
import math

import numpy as np
import pytest

from vlpjax.tasks import vqa_accuracy as vqa
from vlpjax.tasks.vqa_accuracy import normalize_answer, question_accuracy


def official(matches: int, total: int = 10) -> float:
  """By hand: a gt that matches sees matches - 1 others, one that does not sees all."""
  per_gt = ([min(Fraction(1), Fraction(matches - 1, 3))] * matches
            + [min(Fraction(1), Fraction(matches, 3))] * (total - matches))
  return float(sum(per_gt, Fraction(0)) / total)


def answers(matching: str, k: int, other: str = 'cat', total: int = 10) -> list[str]:
  return [matching] * k + [other] * (total - k)


# --- normalisation -------------------------------------------------------------------

@pytest.mark.parametrize('raw, expected', [
    ('two', '2'), ('Two', '2'), ('ten', '10'), ('none', '0'), ('zero', '0'),
    ('two dogs', '2 dogs'), ('twenty', 'twenty'), ('eleven', 'eleven'),
    ('twos', 'twos'),  # whole words only
])
def test_number_words(raw, expected):
  assert normalize_answer(raw) == expected


@pytest.mark.parametrize('raw, expected', [
    ('a dog', 'dog'), ('an apple', 'apple'), ('The dog', 'dog'), ('on the table', 'on table'),
    ('a', ''), ('the one', '1'), ('theater', 'theater'),
])
def test_articles(raw, expected):
  assert normalize_answer(raw) == expected


@pytest.mark.parametrize('raw, expected', [
    ('yes.', 'yes'), ('yes!', 'yes'), ('yes?', 'yes'), ('Yes', 'yes'),
    ('hot-dog', 'hot dog'),          # no space next to '-': replaced by a space
    ('hot - dog', 'hot dog'),        # a space next to '-': deleted
    ('t-shirt', 't shirt'),
    ('red,white', 'red white'), ('red, white', 'red white'),
    ('1,000', '1000'),               # comma between digits: deleted
    ('red-white 1,5', 'redwhite 15'),  # ... and then every mark is deleted
    ('(a) b/c', 'b c'),
    ('3.5', '3.5'), ('5.', '5'), ('e.g.', 'eg'),
    ('x.5', 'x.5'),                  # a period followed by a digit stays ...
    ('5.x', '5x'),                   # ... one after a digit does not (the look-behind is not one)
    ('10:30', '10:30'), ("o'clock", "o'clock"), ('#1', '#1'), ('50%', '50%'),  # not in the list
    ('  yes\n', 'yes'), ('hot\tdog', 'hot dog'),
])
def test_punctuation(raw, expected):
  assert normalize_answer(raw) == expected


def test_at_most_32_periods_are_removed():
  # The official code passes re.UNICODE (32) as the `count` of `sub`.
  assert normalize_answer('a' + '.' * 40) == 'a' + '.' * 8


@pytest.mark.parametrize('raw, expected', [
    ('dont', "don't"), ('Dont', "don't"), ('isnt', "isn't"), ('wont', "won't"),
    ('it isnt', "it isn't"), ("don't", "don't"), ('twas', "'twas"), ('oclock', "o'clock"),
    ("couldn'tve", "couldn't've"), ('yall', "y'all"),
    ('im', 'im'), ('Im', 'im'), ("I'm", "i'm"), ('ive', 'ive'),  # capitalised keys never apply
    ("somebody'd", 'somebodyd'),     # the table's backwards entry
])
def test_contractions(raw, expected):
  assert normalize_answer(raw) == expected


def test_contraction_table_is_complete():
  table = vqa._CONTRACTIONS
  assert len(table) == 120
  assert table["ow's'at"] == table["'ows'at"] == table["'ow'sat"] == "'ow's'at"
  assert table["y'allll"] == "y'all'll" and table["yall'd've"] == "y'all'd've"


# --- per question ----------------------------------------------------------------------

def test_normalisation_applies_when_answers_differ():
  assert question_accuracy('two', answers('2', 3, '3')) == pytest.approx(0.9, abs=1e-12)
  assert question_accuracy('a dog', answers('dog', 4)) == 1.0
  assert question_accuracy('Yes.', answers('yes', 4, 'no')) == 1.0
  assert question_accuracy('hot dog', answers('hot-dog', 4, 'pizza')) == 1.0
  assert question_accuracy('hotdog', answers('hot-dog', 4, 'pizza')) == 0.0
  assert question_accuracy('1000', answers('1,000', 4, '100')) == 1.0
  assert question_accuracy("don't", answers('dont', 4, 'no')) == 1.0
  assert question_accuracy('0', answers('none', 4, '1')) == 1.0
  assert question_accuracy('im', answers("I'm", 4, 'no')) == 0.0


def test_identical_answers_are_not_normalised():
  assert question_accuracy('two', ['2'] * 10) == 0.0
  assert question_accuracy('2', ['2'] * 10) == 1.0
  assert question_accuracy('Yes', ['yes'] * 10) == 0.0
  assert question_accuracy('yes.', ['yes'] * 10) == 0.0
  assert question_accuracy('a dog', ['dog'] * 10) == 0.0
  # Identical after the newline/tab strip, which always applies:
  assert question_accuracy(' yes\t', ['yes\n'] + ['yes'] * 9) == 1.0
  assert question_accuracy('Yes', ['yes\n'] + ['yes'] * 9) == 0.0
  # Raw answers differ, so everything is normalised, even though they agree after it:
  assert question_accuracy('two', ['2'] * 9 + ['two']) == 1.0


def test_leave_one_out_by_hand():
  # 3 of 10 match: the 3 matching gts see 2 others (2/3), the 7 others see 3 (1).
  assert official(3) == pytest.approx((7 * 1.0 + 3 * (2 / 3)) / 10, abs=1e-15)
  assert question_accuracy('dog', answers('dog', 3)) == pytest.approx(0.9, abs=1e-15)
  # 1 of 10: 9 gts see 1 (1/3), the matching one sees 0.
  assert question_accuracy('dog', answers('dog', 1)) == pytest.approx(9 * (1 / 3) / 10, abs=1e-15)
  # 2 of 10: 2 gts see 1 (1/3), 8 see 2 (2/3).
  assert question_accuracy('dog', answers('dog', 2)) == pytest.approx(
      (2 * (1 / 3) + 8 * (2 / 3)) / 10, abs=1e-15)
  # 4 of 10: the matching see 3, the others 4: all capped at 1.
  assert question_accuracy('dog', answers('dog', 4)) == 1.0


@pytest.mark.parametrize('k', range(11))
def test_official_accuracy_equals_soft_score_for_ten_raw_answers(k):
  # TASKS.md's soft score 0, 0.3, 0.6, 0.9, 1.0 (k = 0..3, >= 4) is exactly the
  # leave-one-out average: k * 3/10 * 1/3 ... by hand in Fractions, then floats.
  soft = min(Fraction(1), Fraction(3, 10) * k)
  assert Fraction(official(k)).limit_denominator(1000) == soft
  assert question_accuracy('dog', answers('dog', k)) == pytest.approx(float(soft), abs=1e-12)


def test_other_answer_counts():
  assert question_accuracy('dog', ['dog']) == 0.0             # no other gt to match
  assert question_accuracy('dog', ['dog'] * 3) == pytest.approx(2 / 3)
  assert question_accuracy('dog', ['dog', 'cat']) == pytest.approx((0 + 1 / 3) / 2)
  assert question_accuracy('dog', ['dog'] * 5 + ['cat']) == 1.0
  with pytest.raises(ValueError):
    question_accuracy('dog', [])


# --- aggregation -----------------------------------------------------------------------

QUESTIONS = [  # (prediction, gt answers, answer type, accuracy by hand)
    ('yes', answers('yes', 10), 'yes/no', 1.0),
    ('no', answers('yes', 8, 'no'), 'yes/no', 0.6),
    ('two', ['2'] * 10, 'number', 0.0),
    ('two', answers('2', 1, '3'), 'number', 0.3),
    ('3', answers('3', 5, '4'), 'number', 1.0),
    ('a red car', answers('red car', 3, 'blue car'), 'other', 0.9),
]


def test_per_type_aggregation():
  predictions, gts, types, expected = zip(*QUESTIONS)
  for prediction, gt, accuracy in zip(predictions, gts, expected):
    assert question_accuracy(prediction, gt) == pytest.approx(accuracy, abs=1e-12)
  stats = vqa.compute_stats(predictions, gts, types)
  np.testing.assert_allclose(stats['accuracy_sum'], [1.6, 1.3, 0.9], atol=1e-12)
  np.testing.assert_array_equal(stats['count'], [2, 3, 1])
  result = vqa.summary(stats)
  assert result['accuracy'] == pytest.approx(3.8 / 6, abs=1e-12)
  assert result['accuracy_yes_no'] == pytest.approx(0.8, abs=1e-12)
  assert result['accuracy_number'] == pytest.approx(1.3 / 3, abs=1e-12)
  assert result['accuracy_other'] == pytest.approx(0.9, abs=1e-12)
  assert (result['count'], result['count_yes_no'], result['count_number'],
          result['count_other']) == (6, 2, 3, 1)


def test_summing_halves_equals_whole():
  predictions, gts, types, _ = zip(*QUESTIONS)
  whole = vqa.compute_stats(predictions, gts, types)
  first = vqa.compute_stats(predictions[:3], gts[:3], types[:3])
  second = vqa.compute_stats(predictions[3:], gts[3:], types[3:])
  merged = vqa.merge_stats(first, second)
  np.testing.assert_allclose(merged['accuracy_sum'], whole['accuracy_sum'], atol=1e-12)
  np.testing.assert_array_equal(merged['count'], whole['count'])
  # Plain element-wise addition (what a cross-process sum does) gives the same.
  added = {key: first[key] + second[key] for key in first}
  assert vqa.summary(added) == pytest.approx(vqa.summary(whole), abs=1e-12)


def test_empty_and_invalid():
  result = vqa.summary(vqa.zero_stats())
  assert result['count'] == 0 and math.isnan(result['accuracy'])
  result = vqa.summary(vqa.compute_stats(['yes'], [['yes'] * 10], ['yes/no']))
  assert result['accuracy'] == result['accuracy_yes_no'] == 1.0
  assert math.isnan(result['accuracy_number']) and result['count_number'] == 0
  with pytest.raises(ValueError, match='answer type'):
    vqa.compute_stats(['yes'], [['yes']], ['yes-no'])
  with pytest.raises(ValueError, match='lengths'):
    vqa.compute_stats(['yes', 'no'], [['yes']], ['yes/no'])
