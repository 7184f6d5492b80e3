"""A BERT-format WordPiece vocabulary trained on the world's text with HF `tokenizers`.

The `tokenizers` WordPiece trainer breaks ties between equally frequent merges
in hash-map order, which changes from process to process, so the intermediate
word pieces it keeps differ between runs. The vocabulary written here keeps only
what every run agrees on: the special tokens, every single character of the
trained alphabet (plain and `##`), and every whole word of the corpus, ordered
by (descending count, text). The world's lexicon is closed, so no word of its
text is ever split or unknown, and characters still spell out any new word.

`vocab.txt` is one token a line, the line number is the id: [PAD]=0, [UNK],
[CLS], [SEP], [MASK], then characters, then words.
"""
from __future__ import annotations

import collections
import functools
from typing import Iterable

import tokenizers

from vlpjax import paths
from vlpjax.data import tokenizer as tokenizer_lib
from vlpjax.data import world as world_lib

CONTINUATION = '##'


def train_vocab(texts: Iterable[str], vocab_size: int) -> list[str]:
  """Tokens of the vocabulary trained on `texts`, in id order.

  Raises:
    ValueError: if `vocab_size` is too small for the trainer to form every word.
  """
  texts = list(texts)
  tokenizer = tokenizers.BertWordPieceTokenizer(lowercase=True)
  tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1,
                                special_tokens=list(world_lib.SPECIAL_TOKENS),
                                wordpieces_prefix=CONTINUATION, show_progress=False)
  trained = set(tokenizer.get_vocab())
  words = collections.Counter()
  for text in texts:
    normalized = tokenizer.normalizer.normalize_str(text)
    words.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
  missing = sorted(w for w in words if w not in trained)
  if missing:
    raise ValueError(f'vocab_size={vocab_size} is too small: the trainer did not form the '
                     f'words {missing[:10]} ({len(missing)} in all); raise WorldConfig.vocab_size')
  characters = sorted(t for t in trained if len(t) == 1)
  continuations = sorted(t for t in trained if t.startswith(CONTINUATION)
                         and len(t) == len(CONTINUATION) + 1)
  ordered_words = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
  return list(world_lib.SPECIAL_TOKENS) + characters + continuations + ordered_words


@functools.lru_cache(maxsize=2)
def world_vocab(config: world_lib.WorldConfig) -> tuple[str, ...]:
  """The vocabulary of the world of `config` (trained once per process)."""
  return tuple(train_vocab(world_lib.make_world(config).texts(), config.vocab_size))


def write_vocab(tokens: Iterable[str], path: paths.PathLike) -> None:
  paths.path(path).write_text(''.join(f'{token}\n' for token in tokens), encoding='utf-8')


def load_tokenizer(path: paths.PathLike) -> tokenizers.BertWordPieceTokenizer:
  """A lowercasing BERT WordPiece tokenizer over the vocabulary file at `path`."""
  return tokenizers.BertWordPieceTokenizer(tokenizer_lib.read_vocab(path), lowercase=True,
                                           wordpieces_prefix=CONTINUATION)
