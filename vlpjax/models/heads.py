"""Pretraining and task heads shared across designs (BERT-style)."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpjax.models import layers


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x: [B, T, H], positions: [B, P] int -> [B, P, H]."""
  return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)


class PredictionTransform(nn.Module):
  """BERT's head transform: dense(H -> H) -> GELU -> LayerNorm.

  Submodules: dense, norm.
  """
  hidden_size: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., H_in] -> [..., hidden_size]."""
    h = layers.Dense(self.hidden_size, ('embed', 'embed_out'), dtype=self.dtype,
                     param_dtype=self.param_dtype, name='dense')(x)
    return layers.LayerNorm('embed_out', dtype=self.dtype, param_dtype=self.param_dtype,
                            name='norm')(layers.gelu(h))


class MaskedLMHead(nn.Module):
  """MLM logits at gathered positions only, decoder tied to the word table.

  The table has `layers.padded_vocab_size(vocab_size)` rows V'; the logits of
  the padding ids (vocab_size .. V' - 1) are the dtype's lowest value, so no loss
  or prediction sees them.

  Submodules: transform (PredictionTransform); param `bias` [V']. With
  `float32_logits` the decoder's matmul returns float32 (and the bias is added
  in float32), whatever the compute dtype.
  """
  vocab_size: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  float32_logits: bool = False

  @nn.compact
  def __call__(self, hidden: jax.Array, positions: jax.Array, word_table: jax.Array
               ) -> jax.Array:
    """hidden: [B, T, H]; positions: [B, P]; word_table: [V', H] -> logits [B, P, V']."""
    h = gather_positions(hidden, positions)
    h = PredictionTransform(word_table.shape[1], dtype=self.dtype,
                            param_dtype=self.param_dtype, name='transform')(h)
    bias = self.param('bias', layers.zeros_init(('vocab',)), (word_table.shape[0],),
                      self.param_dtype)
    logits_dtype = jnp.float32 if self.float32_logits else self.dtype
    logits = jnp.einsum('bph,vh->bpv', h, word_table.astype(self.dtype),
                        preferred_element_type=logits_dtype) + bias.astype(logits_dtype)
    if self.vocab_size < word_table.shape[0]:
      word = jnp.arange(word_table.shape[0]) < self.vocab_size
      logits = jnp.where(word, logits, jnp.finfo(logits.dtype).min)
    return layers.constrain(logits, ('batch', 'length', 'vocab'))


class ClassifierHead(nn.Module):
  """PredictionTransform then a dense decoder: [..., H] -> [..., num_classes].

  Submodules: transform, decoder. Used for region class/attribute/feature heads.
  """
  num_classes: int
  hidden_size: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = PredictionTransform(self.hidden_size, dtype=self.dtype,
                            param_dtype=self.param_dtype, name='transform')(x)
    return layers.Dense(self.num_classes, ('embed_out', 'vocab'), dtype=self.dtype,
                        param_dtype=self.param_dtype, name='decoder')(h)


class AnswerHead(nn.Module):
  """VQA-style head: [B, H] -> dense(2H) -> activation -> LN -> dense(num_answers).

  Submodules: hidden, norm, output. (LXMERT, UNITER; see MODELS.md.) The
  activation is GELU but for UNITER's VCR head (`vcr_output`), whose is ReLU.
  """
  num_answers: int
  hidden_size: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = layers.gelu

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    h = layers.Dense(2 * self.hidden_size, ('embed', 'mlp'), dtype=self.dtype,
                     param_dtype=self.param_dtype, name='hidden')(pooled)
    h = layers.LayerNorm('mlp', dtype=self.dtype, param_dtype=self.param_dtype,
                         name='norm')(self.activation(h))
    return layers.Dense(self.num_answers, ('mlp', 'vocab'), dtype=self.dtype,
                        param_dtype=self.param_dtype, name='output')(h)
