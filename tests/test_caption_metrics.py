"""COCO caption metrics: hand-checked BLEU and CIDEr, pycocoevalcap's own scorers,
the Java (PTBTokenizer, METEOR) and Python-fallback paths, errors, results files,
and the CIDEr-D reward against pycocoevalcap's Cider."""
import json
import logging
import math
import os
import shutil
import subprocess

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.spice import get_stanford_models
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
import pytest

from vlpjax.evaluators import caption_metrics as cm

HAS_JAVA = shutil.which('java') is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason='java is not on PATH (PTBTokenizer, METEOR)')

# Already tokenised (lower case, no punctuation), so every tokenizer leaves them as they are.
BLEU_PREDICTIONS = {1: 'a cat on a mat', 2: 'a dog'}
BLEU_REFERENCES = {1: ['a cat is on the mat', 'there is a cat'], 2: ['a dog runs', 'the dog']}

CIDER_PREDICTIONS = {1: 'a cat', 2: 'a dog'}
CIDER_REFERENCES = {1: ['a black cat', 'a cat'], 2: ['a dog']}

# Raw captions on which PTBTokenizer and python_ptb_tokenize agree.
RAW_PREDICTIONS = {
    10: 'A man riding a wave on top of a surfboard.',
    11: "It's a dog's life, isn't it?",
    12: 'Two giraffes standing next to each other (in a field).',
}
RAW_REFERENCES = {
    10: ['A man riding a wave on a surfboard.', 'A surfer rides a big wave!',
         "The man's surfing a wave."],
    11: ["A dog's lying on the couch.", "It's a dog, isn't it?", 'A dog on a sofa.'],
    12: ['Two giraffes stand in a field.', "Giraffes don't like the rain; they're tall.",
         'Two "tall" giraffes next to a tree.'],
}

TYPICAL_CAPTIONS = [
    'A man riding a wave on top of a surfboard.',
    "It's a dog's life, isn't it?",
    "People don't like the colour grey (or gray).",
    'A "red" bus [parked] near the curb; it can\'t move!',
    'Two cats... sleeping -- on a couch: Mr. Smith\'s house.',
    'The U.S. flag flies at 3.5 meters, 1,000 times & 50% of the time.',
    'A black-and-white photo of a 1950s car.',
    "I'm sure they're going to eat; we've seen it, he'll go, she'd say.",
    'A cat sitting on a T.V.',
    "Dogs' toys and 'quoted' text.",
    'THE CAT IS ON THE MAT!',
    'It\u2019s a \u201cquoted\u201d dog\u2019s toy \u2013 with dashes\u2014here.',
    'A cat?!  Wow!!!',
    'won\'t cannot gonna wanna',
]


def ptb(captions):
  """pycocoevalcap's PTBTokenizer on a list of captions."""
  out = PTBTokenizer().tokenize({i: [{'caption': c}] for i, c in enumerate(captions)})
  return [out[i][0] for i in range(len(captions))]


def as_lists(predictions):
  return {k: [v] for k, v in predictions.items()}


@pytest.fixture
def no_java(monkeypatch):
  """Java looks absent, and the once-per-process warning has not been logged yet."""
  monkeypatch.setattr(cm.shutil, 'which', lambda name, *a, **k: None)
  monkeypatch.setattr(cm, '_java_warning_logged', False)


def java_warnings(caplog):
  return [r for r in caplog.records if 'Java was not found' in r.getMessage()]


# --- BLEU ----------------------------------------------------------------------------

def test_bleu_by_hand_corpus_level():
  # Image 1: 5 words; clipped unigrams a (1 of 2), cat, on, mat = 4; bigrams: only
  # "a cat" of 4. Closest reference length to 5: 4 and 6 tie, the shorter (4) wins.
  # Image 2: 2 of 2 unigrams, 1 of 1 bigram, reference length 2.
  # Corpus: 6/7 unigrams, 2/5 bigrams, 7 words vs 6 reference words: no brevity penalty.
  bleu1 = 6 / 7
  bleu2 = math.sqrt(6 / 7 * 2 / 5)
  scores = cm.score_captions(BLEU_PREDICTIONS, BLEU_REFERENCES, metrics=('BLEU',),
                             tokenizer='python')
  assert list(scores) == list(cm.BLEU_KEYS)
  assert scores['BLEU-1'] == pytest.approx(bleu1, rel=1e-8)
  assert scores['BLEU-2'] == pytest.approx(bleu2, rel=1e-8)
  direct, _ = Bleu(4).compute_score(BLEU_REFERENCES, as_lists(BLEU_PREDICTIONS), verbose=0)
  assert direct[0] == pytest.approx(bleu1, rel=1e-8)
  assert direct[1] == pytest.approx(bleu2, rel=1e-8)
  assert [scores[k] for k in cm.BLEU_KEYS] == pytest.approx(direct, rel=1e-12)


def test_bleu_brevity_penalty_by_hand():
  # 2 words, all unigrams and the bigram match; closest reference length 4 (not 6):
  # brevity penalty exp(1 - 4/2).
  predictions = {'img': 'a cat'}
  references = {'img': ['a cat sits here', 'the cat is on a mat']}
  expected = math.exp(1 - 4 / 2)
  scores = cm.score_captions(predictions, references, metrics=('BLEU-1', 'BLEU-2'),
                             tokenizer='python')
  assert scores == pytest.approx({'BLEU-1': expected, 'BLEU-2': expected}, rel=1e-8)
  direct, _ = Bleu(2).compute_score(references, as_lists(predictions), verbose=0)
  assert direct == pytest.approx([expected, expected], rel=1e-8)


# --- CIDEr ---------------------------------------------------------------------------

def cider_by_hand():
  """CIDEr-D of CIDER_PREDICTIONS from the definition: N = 2 images; df(a) = 2 so
  its idf log 2 - log 2 = 0; every other n-gram has df 1, idf log 2."""
  idf = math.log(2)
  # Image 1, "a cat" vs "a cat": cosine 1 for unigrams and bigrams, no 3-/4-grams.
  # vs "a black cat": unigrams (a: 0, cat: idf) . (a: 0, black: idf, cat: idf)
  # = idf^2 over norms idf * sqrt(2) idf; no shared bigram; bigram counts 1 vs 2
  # give the length penalty exp(-1 / (2 * 6^2)).
  unigram_vs_black_cat = idf ** 2 / (idf * math.sqrt(2) * idf) * math.exp(-1 / 72)
  per_order = [1 + unigram_vs_black_cat, 1 + 0, 0, 0]  # summed over the 2 references
  image1 = 10 * (sum(per_order) / 4) / 2
  image2 = 10 * (1 + 1 + 0 + 0) / 4  # "a dog" vs its one reference "a dog"
  return (image1 + image2) / 2, [image1, image2]


def test_cider_by_hand():
  expected, per_image = cider_by_hand()
  direct, direct_per_image = Cider().compute_score(CIDER_REFERENCES,
                                                   as_lists(CIDER_PREDICTIONS))
  assert direct == pytest.approx(expected, rel=1e-12)
  assert direct_per_image == pytest.approx(per_image, rel=1e-12)
  scores = cm.score_captions(CIDER_PREDICTIONS, CIDER_REFERENCES, metrics=('CIDEr',),
                             tokenizer='python')
  assert scores == pytest.approx({'CIDEr': expected}, rel=1e-12)


def test_perfect_and_disjoint_predictions():
  references = {1: ['a man riding a wave on a surfboard'] * 3,
                2: ['two dogs playing with a red frisbee in the park'] * 3}
  perfect = cm.score_captions({k: v[0] for k, v in references.items()}, references,
                              metrics=('BLEU', 'ROUGE_L', 'CIDEr'), tokenizer='python')
  assert perfect['BLEU-4'] == pytest.approx(1.0, abs=1e-6)
  assert perfect['ROUGE_L'] == pytest.approx(1.0)
  assert perfect['CIDEr'] > 5
  disjoint = cm.score_captions({1: 'zebra zebra zebra', 2: 'purple elephant'}, references,
                               metrics=('BLEU', 'ROUGE_L', 'CIDEr'), tokenizer='python')
  assert disjoint['BLEU-1'] < 1e-6
  assert disjoint['ROUGE_L'] == 0
  assert disjoint['CIDEr'] == 0


# --- tokenisers, Java and its fallback -----------------------------------------------

@needs_java
def test_python_tokenizer_matches_ptb():
  assert [cm.python_ptb_tokenize(c) for c in TYPICAL_CAPTIONS] == ptb(TYPICAL_CAPTIONS)


@needs_java
def test_ptb_tokenizer_leaves_the_log_alone(capfd, monkeypatch):
  """Its 'PTBTokenizer tokenized N tokens' report is dropped; anything else the
  Java side writes (here a stand-in's warning) still reaches stderr."""
  cm.tokenize_captions({1: ['A man, riding a horse.']}, tokenizer='ptb')
  assert 'PTBTokenizer' not in capfd.readouterr().err

  def chatty_tokenize(self, captions):
    os.write(2, b'PTBTokenizer tokenized 3 tokens at 9.0 tokens per second.\nWARNING: odd\n')
    return {k: [c['caption'] for c in v] for k, v in captions.items()}
  monkeypatch.setattr(cm.ptbtokenizer.PTBTokenizer, 'tokenize', chatty_tokenize)
  assert cm.tokenize_captions({1: ['two dogs']}, tokenizer='ptb') == {1: ['two dogs']}
  assert capfd.readouterr().err == 'WARNING: odd\n'


def test_python_tokenizer_rules():
  assert cm.python_ptb_tokenize("It's a dog's toy, isn't it?") == "it 's a dog 's toy is n't it"
  assert cm.python_ptb_tokenize("Don't (ever) stop.") == "do n't -lrb- ever -rrb- stop"
  assert cm.python_ptb_tokenize('The U.S. Mr. Smith, 1,000 and 5:30.') == \
      'the u.s. mr. smith 1,000 and 5:30'
  assert cm.python_ptb_tokenize('') == ''
  assert cm.python_ptb_tokenize('Wow... -- two\nlines ?!') == 'wow two lines ?!'


@needs_java
def test_java_path_ptb_and_meteor():
  scores = cm.score_captions(RAW_PREDICTIONS, RAW_REFERENCES)
  assert list(scores) == ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'METEOR', 'ROUGE_L', 'CIDEr']
  assert 0 < scores['METEOR'] <= 1
  # The same as pycocoevalcap's scorers on PTBTokenizer's output.
  ids = list(RAW_PREDICTIONS)
  tokens = ptb([RAW_PREDICTIONS[i] for i in ids])
  gts = {i: ptb(RAW_REFERENCES[i]) for i in ids}
  res = {i: [t] for i, t in zip(ids, tokens)}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  assert [scores[k] for k in cm.BLEU_KEYS] == pytest.approx(bleu, rel=1e-12)
  assert scores['CIDEr'] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
  assert cm.score_captions(RAW_PREDICTIONS, RAW_REFERENCES, metrics=('CIDEr',),
                           tokenizer='ptb') == pytest.approx({'CIDEr': scores['CIDEr']})


def test_fallback_without_java(no_java, caplog):
  caplog.set_level(logging.WARNING)
  scores = cm.score_captions(RAW_PREDICTIONS, RAW_REFERENCES)
  assert list(scores) == ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE_L', 'CIDEr']
  again = cm.score_captions(RAW_PREDICTIONS, RAW_REFERENCES, metrics=('METEOR', 'CIDEr'))
  assert list(again) == ['CIDEr']  # left out, not 0
  (warning,) = java_warnings(caplog)  # once per process
  message = warning.getMessage()
  assert 'python_ptb_tokenize' in message and 'METEOR' in message and 'SPICE' in message
  assert cm.score_captions(RAW_PREDICTIONS, RAW_REFERENCES, metrics=('SPICE',)) == {}


@needs_java
def test_fallback_matches_ptb_path(monkeypatch):
  with_java = cm.score_captions(RAW_PREDICTIONS, RAW_REFERENCES,
                                metrics=('BLEU', 'ROUGE_L', 'CIDEr'))
  monkeypatch.setattr(cm.shutil, 'which', lambda name, *a, **k: None)
  monkeypatch.setattr(cm, '_java_warning_logged', True)
  without_java = cm.score_captions(RAW_PREDICTIONS, RAW_REFERENCES,
                                   metrics=('BLEU', 'ROUGE_L', 'CIDEr'))
  assert without_java == pytest.approx(with_java, rel=1e-12)


def test_tokenize_captions_keeps_images_and_order():
  out = cm.tokenize_captions({'b': ['A Dog.', 'Two dogs!'], 'a': ["It's red."]},
                             tokenizer='python')
  assert out == {'b': ['a dog', 'two dogs'], 'a': ["it 's red"]}
  assert list(out) == ['b', 'a']


# --- errors --------------------------------------------------------------------------

def test_missing_references_named():
  with pytest.raises(ValueError, match=r"no references: \[3, 'x'\]"):
    cm.score_captions({1: 'a cat', 3: 'a dog', 'x': 'a bird'}, {1: ['a cat']},
                      tokenizer='python')
  with pytest.raises(ValueError, match=r'no prediction: \[2\]'):
    cm.score_captions({1: 'a cat'}, {1: ['a cat'], 2: ['a dog']}, tokenizer='python')


def test_bad_inputs():
  with pytest.raises(ValueError, match='predictions is empty'):
    cm.score_captions({}, {}, tokenizer='python')
  with pytest.raises(ValueError, match='empty list of references'):
    cm.score_captions({1: 'a cat'}, {1: []}, tokenizer='python')
  with pytest.raises(ValueError, match='sequence of strings'):
    cm.score_captions({1: 'a cat'}, {1: 'a cat'}, tokenizer='python')
  with pytest.raises(ValueError, match='unknown caption metric'):
    cm.score_captions({1: 'a cat'}, {1: ['a cat']}, metrics=('CIDER',), tokenizer='python')
  with pytest.raises(ValueError, match='tokenizer must be one of'):
    cm.score_captions({1: 'a cat'}, {1: ['a cat']}, tokenizer='nltk')


def test_ptb_tokenizer_without_java(no_java):
  with pytest.raises(RuntimeError, match='Java'):
    cm.score_captions({1: 'a cat'}, {1: ['a cat']}, tokenizer='ptb')


def test_spice_offline_raises_before_java(monkeypatch, tmp_path):
  # No models where pycocoevalcap looks for them (whatever this machine holds),
  # and Java "present": the error comes before any Java process starts.
  monkeypatch.setattr(get_stanford_models, 'SPICEDIR', str(tmp_path))
  monkeypatch.setattr(cm.shutil, 'which', lambda name, *a, **k: '/usr/bin/java')
  def no_subprocess(*args, **kwargs):
    raise AssertionError(f'started a process: {args}')
  monkeypatch.setattr(subprocess, 'Popen', no_subprocess)
  monkeypatch.setattr(subprocess, 'check_call', no_subprocess)
  with pytest.raises(FileNotFoundError, match='not available offline') as error:
    cm.score_captions({1: 'a cat'}, {1: ['a cat']}, metrics=('CIDEr', 'SPICE'))
  assert 'stanford-corenlp-3.6.0-models.jar' in str(error.value)
  assert 'SPICE' not in cm.DEFAULT_METRICS


# --- results files -------------------------------------------------------------------

def test_write_results_round_trip(tmp_path):
  predictions = {391895: 'a man riding a bike', np.int64(7): 'a cat', 'COCO_val_1': 'a dog'}
  path = cm.write_results(tmp_path / 'sub' / 'results.json', predictions)
  records = json.loads(path.read_text())
  assert records == [{'image_id': 391895, 'caption': 'a man riding a bike'},
                     {'image_id': 7, 'caption': 'a cat'},
                     {'image_id': 'COCO_val_1', 'caption': 'a dog'}]
  assert type(records[1]['image_id']) is int
  assert cm.read_results(path) == {391895: 'a man riding a bike', 7: 'a cat',
                                   'COCO_val_1': 'a dog'}
  with pytest.raises(ValueError, match='ints or strings'):
    cm.write_results(tmp_path / 'bad.json', {(1, 2): 'a cat'})
