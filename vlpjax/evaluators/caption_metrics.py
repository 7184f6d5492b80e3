"""COCO caption evaluation (pycocoevalcap): BLEU-1..4, METEOR, ROUGE_L, CIDEr, SPICE.

The scores captioning papers report, computed as the COCO caption server does
(`pycocoevalcap.eval.COCOEvalCap`): captions and references are tokenised by
Stanford's PTBTokenizer (lower case, punctuation removed), then scored by
pycocoevalcap's scorers. Values are as pycocoevalcap returns them: fractions
in [0, 1], CIDEr (CIDEr-D, x10) about 0..10.

* `score_captions`: the corpus scores of one caption per image against that
  image's references.
* `tokenize_captions`, `python_ptb_tokenize`: the tokenisation on its own, and
  the Python stand-in for PTBTokenizer used where there is no Java.
* `write_results`, `read_results`: COCO's results file
  `[{"image_id": ..., "caption": ...}]`.

Java: PTBTokenizer, METEOR and SPICE run in Java. Without `java` on PATH
captions are tokenised by `python_ptb_tokenize` and METEOR and SPICE are left
out of the results (never reported as 0); one warning per process says so.
SPICE is off by default: it needs the Stanford CoreNLP 3.6.0 jars, which
pycocoevalcap downloads on first use; this module never downloads them and
raises if they are missing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Hashable, Iterator, Mapping, Sequence

from etils import epath
import numpy as np
from pycocoevalcap.bleu import bleu as bleu_lib
from pycocoevalcap.cider import cider as cider_lib
from pycocoevalcap.meteor import meteor as meteor_lib
from pycocoevalcap.rouge import rouge as rouge_lib
from pycocoevalcap.spice import get_stanford_models
from pycocoevalcap.tokenizer import ptbtokenizer

from vlpjax import paths

ImageId = Hashable

BLEU_KEYS = ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4')
# Result keys, in COCOEvalCap's order.
METRIC_KEYS = BLEU_KEYS + ('METEOR', 'ROUGE_L', 'CIDEr', 'SPICE')
# 'BLEU' stands for the four BLEU keys; each key may also be asked for alone.
DEFAULT_METRICS = ('BLEU', 'METEOR', 'ROUGE_L', 'CIDEr')
JAVA_METRICS = frozenset({'METEOR', 'SPICE'})
TOKENIZERS = ('auto', 'ptb', 'python')

# pycocoevalcap's own list: tokens dropped after tokenisation.
PTB_PUNCTUATIONS = frozenset(ptbtokenizer.PUNCTUATIONS)

_MAX_IDS_SHOWN = 5
_java_warning_logged = False


# ----------------------------------------------------------------------------
# Python tokenizer
# ----------------------------------------------------------------------------

# Unicode quotes and dashes as PTBTokenizer normalises them (it also drops them).
_CHARACTER_MAP = str.maketrans({
    '\u2018': "'", '\u2019': "'", '\u201c': '"', '\u201d': '"',
    '\u2013': ' -- ', '\u2014': ' -- ', '\u2026': ' ... '})
# PTB escapes brackets; -lowerCase makes these lower case, so PUNCTUATIONS
# (which lists '-LRB-' ...) never matches them and they stay in the caption.
_BRACKETS = {'(': '-lrb-', ')': '-rrb-', '[': '-lsb-', ']': '-rsb-',
             '{': '-lcb-', '}': '-rcb-'}
_BRACKET_TOKENS = frozenset(_BRACKETS.values())
_CONTRACTION_SUFFIXES = ("n't", "'s", "'m", "'d", "'re", "'ve", "'ll")
_SPLIT_WORDS = {'cannot': ('can', 'not'), 'gonna': ('gon', 'na'), 'gotta': ('got', 'ta'),
                'wanna': ('wan', 'na'), 'lemme': ('lem', 'me'), 'gimme': ('gim', 'me')}
_ABBREVIATIONS = frozenset({'mr', 'mrs', 'ms', 'dr', 'st', 'jr', 'sr', 'vs', 'etc', 'prof',
                            'mt', 'ft'})
_ACRONYM = re.compile(r'(?:[^\W\d_]\.)+[^\W\d_]')  # u.s, a.m, t.v (before the last '.')
_SEPARATORS = [
    (re.compile(r'[(){}\[\]]'), lambda m: f' {_BRACKETS[m.group()]} '),
    (re.compile(r'"|``|\'\'|`'), ' `` '),  # double quotes, TeX quotes: dropped
    (re.compile(r'\.{2,}'), ' ... '),
    (re.compile(r'-{2,}'), ' -- '),
    (re.compile(r'[?!]+'), r' \g<0> '),  # a run ("?!", "!!!") is one token
    (re.compile(r',(?!\d)|(?<!\d),'), ' , '),  # 1,000 stays one number
    (re.compile(r':(?!\d)|(?<!\d):'), ' : '),  # so does 5:30
    (re.compile(r';'), ' ; '),
    (re.compile(r'[$#%]'), r' \g<0> '),
]


def _split_word(token: str) -> list[str]:
  """One whitespace-separated chunk (lower case) as PTB tokens."""
  if not any(c.isalnum() for c in token) or token in _BRACKET_TOKENS:
    return [token]  # '...', '?!', '-lrb-': already whole tokens
  head, tail = [], []
  if len(token) > 1 and token[-1] in '-/':  # "well-", "w/"
    tail.insert(0, token[-1])
    token = token[:-1]
  if len(token) > 1 and token.endswith('.'):
    stem = token[:-1]
    # The period stays on abbreviations ("mr.") and acronyms ("u.s.").
    if stem not in _ABBREVIATIONS and not _ACRONYM.fullmatch(stem):
      tail.insert(0, '.')
      token = stem
  if (len(token) > 1 and token.startswith("'") and token not in _CONTRACTION_SUFFIXES
      and not token[1].isdigit()):  # an opening quote, but not "'90s"
    head.append("'")
    token = token[1:]
  if len(token) > 1 and token.endswith("'"):  # closing quote, plural possessive "dogs'"
    tail.insert(0, "'")
    token = token[:-1]
  if token in _SPLIT_WORDS:
    return head + list(_SPLIT_WORDS[token]) + tail
  for suffix in _CONTRACTION_SUFFIXES:
    if token.endswith(suffix) and len(token) > len(suffix):
      return head + [token[:-len(suffix)], suffix] + tail
  return head + [token] + tail


def python_ptb_tokenize(caption: str) -> str:
  """A caption tokenised like pycocoevalcap's PTBTokenizer, in Python (no Java).

  Reproduces Stanford PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`) followed
  by pycocoevalcap's removal of `PUNCTUATIONS`, for ordinary captions:

  1. Lower case; curly quotes become straight ones, en/em dashes '--',
     '\u2026' '...'.
  2. Split off as tokens: brackets, as PTB's escapes '-lrb-' '-rrb-' '-lsb-'
     '-rsb-' '-lcb-' '-rcb-' (lower case, so `PUNCTUATIONS` does not remove
     them: they stay, as with PTBTokenizer); double quotes and '``' '\\'\\''
     '`'; runs of dots ('...') and of hyphens ('--'); runs of '?' / '!' as
     one token ('?!' stays, as in PTB); ',' and ':' except between digits
     (1,000 and 5:30 stay whole); ';' '$' '#' '%'.
  3. Per whitespace-separated word: a trailing '-' or '/' ("well-", "w/");
     a final '.' unless the word is an acronym ("u.s.", "t.v.", "a.m.") or
     one of mr mrs ms dr st jr sr vs etc prof mt ft; an opening "'"
     (not in "'90s" or a bare "'s"); a closing "'" ("dogs'"); the contractions
     n't 's 'm 'd 're 've 'll ("don't" -> "do n't", "can't" -> "ca n't",
     "it's" -> "it 's"); cannot gonna gotta wanna lemme gimme -> two tokens
     ("can not", "gon na").
  4. Drop the tokens in `PTB_PUNCTUATIONS` (pycocoevalcap's list); join with
     single spaces.

  Known differences from PTBTokenizer, all rare in captions: no
  number/unit splitting ("5:30pm" stays whole, PTB gives "5:30 pm"); "y'all",
  "rock 'n' roll" and other apostrophe words PTB treats specially; PTB's
  abbreviation list is longer and context dependent ("no. 5" keeps its
  period there, "there is no." does not; here neither does); HTML entities
  and British spellings are left as they are (PTB 3.4.1 keeps the spellings
  too).
  """
  text = ' '.join(caption.split()).translate(_CHARACTER_MAP).lower()
  for pattern, replacement in _SEPARATORS:
    text = pattern.sub(replacement, text)
  tokens = [t for word in text.split() for t in _split_word(word)]
  return ' '.join(t for t in tokens if t not in PTB_PUNCTUATIONS)


# ----------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------

def java_available() -> bool:
  """Whether `java` is on PATH (PTBTokenizer, METEOR and SPICE need it)."""
  return shutil.which('java') is not None


def _resolve_tokenizer(tokenizer: str, has_java: bool) -> str:
  if tokenizer not in TOKENIZERS:
    raise ValueError(f'tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}')
  if tokenizer == 'ptb' and not has_java:
    raise RuntimeError("tokenizer='ptb' runs Stanford PTBTokenizer in Java, but `java` was "
                       "not found on PATH: install a Java runtime (e.g. OpenJDK 17) or "
                       "pass tokenizer='python' (or 'auto') for the Python fallback")
  if tokenizer == 'auto':
    return 'ptb' if has_java else 'python'
  return tokenizer


def _warn_no_java_once() -> None:
  global _java_warning_logged
  if _java_warning_logged:
    return
  _java_warning_logged = True
  logging.warning(
      'caption_metrics: Java was not found on PATH (`java`), so captions are tokenised '
      'by the Python fallback caption_metrics.python_ptb_tokenize (documented there; it '
      'matches PTBTokenizer on ordinary captions) instead of Stanford PTBTokenizer, and '
      'METEOR and SPICE, which run in Java, are left out of the results (not reported '
      'as 0). Install a Java runtime for the official scores. (Logged once per process.)')


@contextlib.contextmanager
def _java_stderr() -> Iterator[list[str]]:
  """Collects what is written to file descriptor 2 inside the block (the Java
  tokenizer inherits it) into the yielded list of lines, and writes back to
  stderr all but PTBTokenizer's 'PTBTokenizer tokenized N tokens at ...' report,
  which would land in the middle of a run's log."""
  lines: list[str] = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield lines
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines += captured.read().decode(errors='replace').splitlines()
      kept = [line for line in lines if not line.startswith('PTBTokenizer tokenized')]
      if kept:
        print('\n'.join(kept), file=sys.stderr, flush=True)


def _ptb_tokenize(texts: Sequence[str]) -> list[str]:
  # PTBTokenizer writes one caption per line and zips its output lines back to
  # the captions, so a caption with a line break would shift all later ones:
  # every whitespace run (\n, \r, \u2028, ...) becomes one space first.
  flat = {i: [{'caption': ' '.join(text.split())}] for i, text in enumerate(texts)}
  with _java_stderr() as java_output:
    tokenized = ptbtokenizer.PTBTokenizer().tokenize(flat)
  if len(tokenized) != len(texts) or any(len(tokenized.get(i, ())) != 1
                                         for i in range(len(texts))):
    raise RuntimeError(f'PTBTokenizer returned {len(tokenized)} captions for {len(texts)}; '
                       f'the Java tokenizer failed: {" / ".join(java_output) or "no output"}')
  return [tokenized[i][0] for i in range(len(texts))]


def _tokenize(texts: Sequence[str], tokenizer: str) -> list[str]:
  """`texts` tokenised by a resolved tokenizer ('ptb' or 'python')."""
  if not texts:
    return []
  if tokenizer == 'ptb':
    return _ptb_tokenize(texts)
  return [python_ptb_tokenize(text) for text in texts]


def tokenize_captions(captions: Mapping[ImageId, Sequence[str]], tokenizer: str = 'auto'
                      ) -> dict[ImageId, list[str]]:
  """Each image's captions tokenised as the COCO evaluation does.

  Args:
    captions: image id -> its captions.
    tokenizer: 'ptb' (Stanford PTBTokenizer; needs Java), 'python'
      (`python_ptb_tokenize`) or 'auto' (PTB when Java is found, else Python,
      with one warning per process).

  Returns:
    image id -> its tokenised captions (lower case, space-separated tokens,
    punctuation removed), in the given order.

  Raises:
    ValueError on an unknown tokenizer or a caption that is not a string;
    RuntimeError for tokenizer='ptb' without Java.
  """
  has_java = java_available()
  resolved = _resolve_tokenizer(tokenizer, has_java)
  if not has_java:
    _warn_no_java_once()
  ids = list(captions)
  counts = []
  texts = []
  for image_id in ids:
    image_captions = _caption_list(captions[image_id], image_id, 'captions')
    counts.append(len(image_captions))
    texts.extend(image_captions)
  tokens = iter(_tokenize(texts, resolved))
  return {image_id: [next(tokens) for _ in range(count)] for image_id, count in zip(ids, counts)}


# ----------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------

def _few(ids: Sequence[Any]) -> str:
  shown = ', '.join(repr(i) for i in ids[:_MAX_IDS_SHOWN])
  more = f' and {len(ids) - _MAX_IDS_SHOWN} more' if len(ids) > _MAX_IDS_SHOWN else ''
  return f'[{shown}]{more}'


def _caption_list(value: Any, image_id: ImageId, what: str) -> list[str]:
  if isinstance(value, np.ndarray):
    value = value.tolist()
  # A bare string is a sequence of characters: refuse it rather than score letters.
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(f'{what} of image {image_id!r} must be a sequence of strings, '
                     f'got {type(value).__name__}: {value!r}')
  for caption in value:
    if not isinstance(caption, str):
      raise ValueError(f'{what} of image {image_id!r} must be strings, got '
                       f'{type(caption).__name__}: {caption!r}')
  return list(value)


def _check_inputs(predictions: Mapping[ImageId, str],
                  references: Mapping[ImageId, Sequence[str]]) -> None:
  if not predictions:
    raise ValueError('predictions is empty: there is no caption to score')
  without_references = [i for i in predictions if i not in references]
  without_prediction = [i for i in references if i not in predictions]
  problems = []
  if without_references:
    problems.append(f'{len(without_references)} predicted image(s) have no references: '
                    f'{_few(without_references)}')
  if without_prediction:
    problems.append(f'{len(without_prediction)} referenced image(s) have no prediction: '
                    f'{_few(without_prediction)}')
  if problems:
    raise ValueError('predictions and references must cover the same images; '
                     + '; '.join(problems))
  for image_id, caption in predictions.items():
    if not isinstance(caption, str):
      raise ValueError(f'prediction of image {image_id!r} must be a string, got '
                       f'{type(caption).__name__}: {caption!r}')
  empty = [i for i in references if not _caption_list(references[i], i, 'references')]
  if empty:
    raise ValueError(f'{len(empty)} image(s) have an empty list of references: {_few(empty)}')


def _requested_keys(metrics: Sequence[str]) -> list[str]:
  if isinstance(metrics, str):
    metrics = (metrics,)
  keys = set()
  for metric in metrics:
    if metric == 'BLEU':
      keys.update(BLEU_KEYS)
    elif metric in METRIC_KEYS:
      keys.add(metric)
    else:
      raise ValueError(f'unknown caption metric {metric!r}; choose from '
                       f"{('BLEU',) + METRIC_KEYS}")
  if not keys:
    raise ValueError('metrics is empty: ask for at least one caption metric')
  return [k for k in METRIC_KEYS if k in keys]


def spice_model_files() -> tuple[str, str]:
  """The Stanford CoreNLP 3.6.0 jars SPICE needs (where pycocoevalcap puts them)."""
  folder = os.path.join(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB)
  return (os.path.join(folder, f'{get_stanford_models.JAR}.jar'),
          os.path.join(folder, f'{get_stanford_models.JAR}-models.jar'))


def _check_spice_models() -> None:
  # Spice() would download them (~400 MB from nlp.stanford.edu) and, offline,
  # hang or fail deep inside urllib: check first and say what is missing.
  missing = [f for f in spice_model_files() if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(
        f'SPICE needs the Stanford CoreNLP models, which are not available offline: missing '
        f'{missing}. pycocoevalcap downloads them on first use and this module never does; '
        'on a machine with network run `python -c "from pycocoevalcap.spice.'
        'get_stanford_models import get_stanford_models; get_stanford_models()"` (or copy '
        f'{[os.path.basename(f) for f in spice_model_files()]} into that folder), or leave '
        "'SPICE' out of metrics")


def _meteor_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
  scorer = meteor_lib.Meteor()
  try:
    score, _ = scorer.compute_score(gts, res)
  finally:
    # The METEOR JVM (2 GB heap) would otherwise live until garbage collection.
    scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
  return float(score)


def _spice_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
  from pycocoevalcap.spice import spice as spice_lib  # pylint: disable=g-import-not-at-top
  score, _ = spice_lib.Spice().compute_score(gts, res)
  return float(score)


def score_captions(predictions: Mapping[ImageId, str],
                   references: Mapping[ImageId, Sequence[str]], *,
                   metrics: Sequence[str] = DEFAULT_METRICS,
                   tokenizer: str = 'auto') -> dict[str, float]:
  """COCO caption scores of one predicted caption per image.

  As the COCO caption evaluation (`pycocoevalcap.eval.COCOEvalCap`): all
  captions are tokenised, then scored at corpus level (BLEU from corpus n-gram
  statistics with the 'closest' reference length; CIDEr with document
  frequencies from these references; METEOR, ROUGE_L, SPICE as pycocoevalcap
  aggregates them).

  Args:
    predictions: image id -> predicted caption (raw text).
    references: image id -> its reference captions (raw text), the same images.
    metrics: from 'BLEU' (= 'BLEU-1'..'BLEU-4'), 'BLEU-1'..'BLEU-4', 'METEOR',
      'ROUGE_L', 'CIDEr', 'SPICE' (off by default: it needs the Stanford
      CoreNLP models on disk, see `spice_model_files`).
    tokenizer: 'auto' (PTBTokenizer when `java` is on PATH, else the Python
      fallback `python_ptb_tokenize`), 'ptb' (Java required) or 'python'.

  Returns:
    metric key -> score, in COCOEvalCap's order: 'BLEU-1'..'BLEU-4', 'METEOR',
    'ROUGE_L', 'CIDEr', 'SPICE' (those asked for). Without Java, METEOR and
    SPICE are absent (one warning per process says so), never 0.

  Raises:
    ValueError: empty predictions; images with a prediction but no
      references or the reverse (naming a few); an empty reference list; a
      non-string caption; an unknown metric or tokenizer.
    RuntimeError: tokenizer='ptb' without Java.
    FileNotFoundError: SPICE asked for (with Java) but its models are not on
      disk.
  """
  keys = _requested_keys(metrics)
  _check_inputs(predictions, references)
  has_java = java_available()
  resolved = _resolve_tokenizer(tokenizer, has_java)
  if not has_java:
    _warn_no_java_once()
    keys = [k for k in keys if k not in JAVA_METRICS]
  if 'SPICE' in keys:
    _check_spice_models()

  # Images as 0..N-1: SPICE sorts and JSON-encodes the ids, which any hashable
  # id (tuples, numpy ints, mixed types) would not survive.
  ids = list(predictions)
  reference_lists = [list(references[i]) for i in ids]
  texts = [predictions[i] for i in ids] + [r for refs in reference_lists for r in refs]
  tokens = _tokenize(texts, resolved)
  res = {index: [tokens[index]] for index in range(len(ids))}
  offset = len(ids)
  gts = {}
  for index, refs in enumerate(reference_lists):
    gts[index] = tokens[offset:offset + len(refs)]
    offset += len(refs)

  scores = {}
  if any(k in BLEU_KEYS for k in keys):
    bleu, _ = bleu_lib.Bleu(4).compute_score(gts, res, verbose=0)
    scores.update(zip(BLEU_KEYS, map(float, bleu)))
  if 'METEOR' in keys:
    scores['METEOR'] = _meteor_score(gts, res)
  if 'ROUGE_L' in keys:
    scores['ROUGE_L'] = float(rouge_lib.Rouge().compute_score(gts, res)[0])
  if 'CIDEr' in keys:
    scores['CIDEr'] = float(cider_lib.Cider().compute_score(gts, res)[0])
  if 'SPICE' in keys:
    scores['SPICE'] = _spice_score(gts, res)
  return {k: scores[k] for k in keys}


# ----------------------------------------------------------------------------
# Results files
# ----------------------------------------------------------------------------

def _json_image_id(image_id: ImageId) -> Any:
  # Numpy ids (from arrays of image ids) as the Python int/str they stand for.
  if isinstance(image_id, np.generic):
    image_id = image_id.item()
  if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
    raise ValueError(f'image ids must be ints or strings for a COCO results file, got '
                     f'{type(image_id).__name__}: {image_id!r}')
  return image_id


def write_results(path: str | os.PathLike, predictions: Mapping[ImageId, str]) -> epath.Path:
  """Writes COCO's caption results file `[{"image_id": ..., "caption": ...}]`.

  Image ids are kept as given (an int stays an int, a string a string; numpy
  scalars become their Python value), in `predictions`' order. `path` may be
  local or gs:// (etils.epath); its folder is created.

  Returns:
    The path written.

  Raises:
    ValueError on an image id that is not an int or string, or a caption that
    is not a string.
  """
  records = []
  for image_id, caption in predictions.items():
    if not isinstance(caption, str):
      raise ValueError(f'caption of image {image_id!r} must be a string, got '
                       f'{type(caption).__name__}: {caption!r}')
    records.append({'image_id': _json_image_id(image_id), 'caption': caption})
  path = paths.path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(records))
  return path


def read_results(path: str | os.PathLike) -> dict[ImageId, str]:
  """A COCO caption results file as image id -> caption (ids as in the file)."""
  records = json.loads(paths.path(path).read_text())
  return {record['image_id']: record['caption'] for record in records}

