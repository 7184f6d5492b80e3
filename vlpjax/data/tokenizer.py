"""BERT WordPiece tokenisation to fixed shapes, with HF `tokenizers`.

The vocabulary is a BERT-format `vocab.txt` (one token a line, the line number is
the id): the embedded dataset's own by default, or a user's `bert-base-uncased`
/ `bert-base-cased` vocabulary by path (UNITER uses the cased one). Nothing is
downloaded.

Outputs follow BERT: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` with token types
0 for `a` and 1 for `b`, truncated (longest first) and padded with [PAD] to
`max_len`.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from vlpjax import paths

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def read_vocab(vocab_file: paths.PathLike) -> dict[str, int]:
  """Reads a BERT `vocab.txt` (or the `vocab.txt` inside a model directory)."""
  location = paths.path(vocab_file)
  if location.is_dir():
    location = vocab_file = location / 'vocab.txt'
  if not location.is_file():
    raise FileNotFoundError(f'vocabulary file {os.fspath(vocab_file)!r} does not exist')
  tokens = location.read_text(encoding='utf-8').split('\n')
  if tokens and not tokens[-1]:
    tokens.pop()  # the final newline
  vocab = {}
  for line_number, token in enumerate(tokens, start=1):
    if not token:
      raise ValueError(f'{vocab_file}:{line_number}: empty token')
    if token in vocab:
      raise ValueError(f'{vocab_file}:{line_number}: duplicate token {token!r}')
    vocab[token] = line_number - 1
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f'{vocab_file}: not a BERT vocabulary, missing {missing}')
  return vocab


def vocab_is_cased(vocab: dict[str, int]) -> bool:
  """A vocabulary is cased when an ordinary token has an upper-case letter."""
  return any(not (t.startswith('[') and t.endswith(']')) and t != t.lower() for t in vocab)


class BertTokenizer:
  """Encodes batches of text (or text pairs) to fixed-length int32 arrays.

  Args:
    vocab_file: BERT `vocab.txt`, or a directory holding one.
    max_len: output length T, including [CLS] and [SEP]s.
    lowercase: lower-case (and strip accents) before WordPiece; None follows the
      vocabulary (cased vocabularies such as bert-base-cased are not lowercased).
  """

  def __init__(self, vocab_file: str, max_len: int, *, lowercase: bool | None = None):
    if max_len < 3:
      raise ValueError(f'max_len must leave room for [CLS] x [SEP], got {max_len}')
    self.vocab_file = vocab_file
    self.vocab = read_vocab(vocab_file)
    cased = vocab_is_cased(self.vocab)
    if lowercase is None:
      lowercase = not cased
    elif lowercase and cased:
      logging.warning('lowercasing text for the cased vocabulary %s: cased tokens '
                      'will never be produced', vocab_file)
    self.lowercase = lowercase
    self.max_len = max_len
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        self.vocab[t] for t in SPECIAL_TOKENS)

    tokenizer = tokenizers.Tokenizer(models.WordPiece(self.vocab, unk_token='[UNK]'))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # ids unchanged: already in vocab
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
        lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single='[CLS] $A:0 [SEP]:0', pair='[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1',
        special_tokens=[('[CLS]', self.cls_id), ('[SEP]', self.sep_id)])
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.enable_truncation(max_len, strategy='longest_first')
    tokenizer.enable_padding(length=max_len, pad_id=self.pad_id, pad_token='[PAD]')
    self._tokenizer = tokenizer

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None
             ) -> dict[str, np.ndarray]:
    """Tokenises a batch.

    Args:
      texts: B strings (segment A).
      pairs: optional B strings (segment B, token type 1).

    Returns:
      input_ids, text_mask, token_type_ids: int32 [B, max_len].
    """
    texts = list(texts)
    if pairs is None:
      inputs = texts
    else:
      pairs = list(pairs)
      if len(pairs) != len(texts):
        raise ValueError(f'got {len(texts)} texts but {len(pairs)} pairs')
      inputs = list(zip(texts, pairs))
    encodings = self._tokenizer.encode_batch(inputs)
    return dict(
        input_ids=np.array([e.ids for e in encodings], np.int32).reshape(-1, self.max_len),
        text_mask=np.array([e.attention_mask for e in encodings], np.int32
                           ).reshape(-1, self.max_len),
        token_type_ids=np.array([e.type_ids for e in encodings], np.int32
                                ).reshape(-1, self.max_len))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` without special tokens (for logs and tests)."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
