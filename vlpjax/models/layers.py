"""Layers shared by the four fusion designs (BERT conventions, see shared MODELS.md).

Every parameter carries logical axis names so that `vlpjax.sharding` can place it
on a mesh with rules from the config. Logical names used here:

  batch, length (text positions), regions (image positions), embed (hidden),
  mlp (FFN inner), heads, kv (per-head dim), vocab, feature (region input dim),
  loc (box coordinates), types (token types), positions (position table rows).

BERT conventions held throughout: exact-erf GELU, LayerNorm eps 1e-12, N(0, 0.02)
init, attention that ignores padded keys exactly as an additive -10000 mask does
(a boolean mask gives the same result for every query with at least one valid key).

The backbone contract shared by the four designs (their `MODEL.__call__`):

* Masks. `text_mask` [B, T] and `region_mask` [B, R] mark the real keys; an
  optional full `attention_mask` [B, T+R, T+R] (1/True = the query may attend to
  the key) over the concatenation [text (T positions); regions (R positions)] is
  ANDed with them. Single-stream designs use it over their joint sequence;
  two-stream designs take its blocks (`attention_mask_blocks`): text
  self-attention [:T, :T], region self-attention [T:, T:], text queries over
  region keys [:T, T:], region queries over text keys [T:, :T]. A query that an
  `attention_mask` leaves with no key at all (e.g. regions under a seq2seq mask
  in a two-stream cross-attention) gets a zero attention context (probabilities
  all zero), so nothing it cannot see reaches it. Without `attention_mask` the
  outputs are exactly those of the key masks alone.
* Attention probabilities. `return_attention=True` adds `outputs['attention']`,
  a dict keyed `f'{stream}/layer_{i}'` (see `attention_key`) -> float32
  probabilities [B, heads, Q, K], `stream` one of `ATTENTION_STREAMS`:

    joint           single-stream self-attention over [text; regions]
                    (queries and keys both in that order), Q = K = T+R
    text            text self-attention, [B, N, T, T]
    vision          region self-attention, [B, N, R, R]
    text_to_vision  text queries over region keys, [B, N, T, R]
    vision_to_text  region queries over text keys, [B, N, R, T]

  `i` counts the attention layers of that stream from 0 in the order they run
  (LXMERT's text self-attentions: its text layers, then those inside the
  cross layers).
* Decoding (captioning). `decoding=Decoding(...)` makes a backbone keep keys
  and values in flax's 'cache' collection (apply with `mutable=['cache']`).
  Prefill (`Decoding.prefill()`): the call runs as usual over [text (T slots);
  regions] and every attention that text queries read stores the keys/values of
  its whole key sequence. Step (`Decoding.step_at(index)`): `input_ids` [B, Q]
  are new tokens at text positions index .. index+Q-1; `text_mask` [B, T] and
  `region_mask` still mark the cached layout's keys, `attention_mask` [B, Q,
  T+R] (required) holds the new tokens' rows of the full mask. Text
  self-attentions write the new keys/values into their slots and attend over the
  cache; text-to-region attentions read the cached region keys/values; nothing
  on the region side runs (a decoding mask keeps regions independent of the
  text, so their states are final after the prefill). Outputs of a step:
  'text' [B, Q, H] and 'word_embeddings'.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Axes = Sequence[str | None]

LAYER_NORM_EPS = 1e-12
INIT_STD = 0.02
ATTENTION_IMPLS = ('xla', 'cudnn', 'auto')
# The streams of `outputs['attention']` (see the module docstring).
ATTENTION_STREAMS = ('joint', 'text', 'vision', 'text_to_vision', 'vision_to_text')


def gelu(x: jax.Array) -> jax.Array:
  """Exact erf GELU, as BERT and all four originals use (not jax's tanh default)."""
  return jax.nn.gelu(x, approximate=False)


def normal_init(axes: Axes, std: float = INIT_STD) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: Axes) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: Axes) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Names an activation's axes; a no-op outside a mesh with logical rules."""
  return nn.with_logical_constraint(x, axes)


def LayerNorm(axis: str = 'embed', *, dtype: Dtype = jnp.float32,  # pylint: disable=invalid-name
              param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with BERT's eps 1e-12; params `scale`/`bias` of logical axis `axis`."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
                      scale_init=ones_init((axis,)), bias_init=zeros_init((axis,)),
                      name=name)


def Dense(features: int, axes: tuple[str, str] = ('embed', 'mlp'), *,  # pylint: disable=invalid-name
          use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
  """`nn.Dense` whose kernel [in, out] has logical axes `axes` (bias: axes[1])."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=normal_init(axes), bias_init=zeros_init((axes[1],)),
                  name=name)


# Word tables have a multiple of this many rows, so that any `tensor` axis up to
# 128 divides them (30,522 does not divide by 4 or 8, and an undivided table would
# stay replicated). The padding ids never occur in the input, and the MLM head
# masks their logits.
VOCAB_ROW_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
  """Rows of the word table for a vocabulary of `vocab_size` ids."""
  return -(-vocab_size // VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE


class Embed(nn.Module):
  """Embedding table [num, features] with logical axes `axes`.

  `__call__` returns (embeddings, table) so heads can tie to the table.
  """
  num_embeddings: int
  features: int
  axes: tuple[str, str] = ('vocab', 'embed')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, extra_rows: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """ids: [...] int -> ([..., features], the table [num, features]).

    extra_rows: [K, features] or None, rows num .. num + K - 1 that ids may also
    index: a task's rows past the table (VCR's region tokens), held by the task
    so the table keeps its shape and pretrained checkpoints load.
    """
    table = self.param('embedding', normal_init(self.axes),
                       (self.num_embeddings, self.features), self.param_dtype)
    rows = table if extra_rows is None else jnp.concatenate(
        [table, extra_rows.astype(table.dtype)], axis=0)
    return jnp.take(rows, ids, axis=0).astype(self.dtype), table


class HeadsDense(nn.Module):
  """Dense layer into attention heads, [B, T, E] -> [B, T, N, D] with kernel
  [E, N, D], or, given `out_features` F, out of them, [B, T, N, D] -> [B, T, F]
  with kernel [N, D, F].

  The kernel keeps the per-head layout of the checkpoints (logical axes embed,
  heads, kv) but is multiplied as one [E, N*D] or [N*D, F] matrix: a dot that
  contracts two axes makes XLA copy the kernel into a transposed layout for the
  backward pass (and the gradient back), while reshaping a row-major array is free.
  """
  num_heads: int
  head_dim: int
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    heads = (self.num_heads, self.head_dim)
    width = self.num_heads * self.head_dim
    if self.out_features is None:
      kernel_shape, kernel_axes = (x.shape[-1],) + heads, ('embed', 'heads', 'kv')
      bias_shape, bias_axes = heads, ('heads', 'kv')
    else:
      kernel_shape, kernel_axes = heads + (self.out_features,), ('heads', 'kv', 'embed')
      bias_shape, bias_axes = (self.out_features,), ('embed',)
    kernel = self.param('kernel', normal_init(kernel_axes), kernel_shape, self.param_dtype)
    bias = self.param('bias', zeros_init(bias_axes), bias_shape, self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.out_features is None:
      y = x @ kernel.reshape(x.shape[-1], width)
      return y.reshape(x.shape[:-1] + heads) + bias
    return x.reshape(x.shape[:-2] + (width,)) @ kernel.reshape(width, -1) + bias


def resolve_attention_impl(impl: str, dtype: Dtype) -> str | None:
  """Maps the `attention_impl` config field to `jax.nn.dot_product_attention`'s.

  'auto' picks cuDNN on GPU for half-precision compute (its fused kernels need
  fp16/bf16) and XLA elsewhere.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
  if impl == 'auto':
    on_gpu = jax.default_backend() == 'gpu'
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return 'cudnn' if on_gpu and half else 'xla'
  return impl


def attention_key(stream: str, index: int) -> str:
  """The `outputs['attention']` key of layer `index` of `stream` ('text/layer_0')."""
  if stream not in ATTENTION_STREAMS:
    raise ValueError(f'attention stream must be one of {ATTENTION_STREAMS}, got {stream!r}')
  return f'{stream}/layer_{index}'


@struct.dataclass
class Decoding:
  """How a backbone call uses the KV cache (module docstring, "Decoding").

  Attributes:
    index: int32 scalar, the text position of the first new token (step only).
    step: False for the prefill, True for a step over cached keys/values.
  """
  index: jax.Array
  step: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def prefill(cls) -> 'Decoding':
    return cls(jnp.zeros((), jnp.int32), step=False)

  @classmethod
  def step_at(cls, index: jax.Array | int) -> 'Decoding':
    return cls(jnp.asarray(index, jnp.int32), step=True)

  def position_ids(self, num_new: int) -> jax.Array:
    """[1, Q] text position ids of the step's new tokens."""
    return self.index + jnp.arange(num_new, dtype=jnp.int32)[None, :]


def is_step(decoding: Decoding | None) -> bool:
  """Whether a call is a decoding step (its region side is skipped)."""
  return decoding is not None and decoding.step


def check_attention_mask(attention_mask: jax.Array | None, batch: int, num_text: int,
                         num_regions: int, decoding: Decoding | None = None
                         ) -> jax.Array | None:
  """Checks a full attention mask [B, T+R, T+R] (a leading 1 broadcasts over the
  batch; a decoding step's is [B, Q, T+R], its queries the new tokens) and
  returns it as bool (None stays None; a step requires one)."""
  length = num_text + num_regions
  if is_step(decoding):
    if attention_mask is None:
      raise ValueError('a decoding step needs attention_mask [B, Q, T+R]: the new tokens\' '
                       'rows of the full mask, which keep them off later (stale) cache slots')
    if attention_mask.ndim != 3 or attention_mask.shape[0] not in (1, batch) or \
        attention_mask.shape[2] != length:
      raise ValueError(f'a decoding step\'s attention_mask must be [B, Q, T+R] with '
                       f'T+R = {length} (the cached layout), got {tuple(attention_mask.shape)}')
    return attention_mask.astype(bool)
  if attention_mask is None:
    return None
  shape = tuple(attention_mask.shape)
  if len(shape) != 3 or shape[1:] != (length, length) or shape[0] not in (1, batch):
    raise ValueError(f'attention_mask must be [B, T+R, T+R] = [{batch}, {length}, {length}] '
                     f'over [text (T={num_text}); regions (R={num_regions})], got {shape}')
  return attention_mask.astype(bool)


def attention_mask_blocks(attention_mask: jax.Array | None, num_text: int
                          ) -> dict[str, jax.Array | None]:
  """The blocks of a full mask [B, T+R, T+R] that two-stream designs use, keyed
  by stream: 'text' [:T, :T], 'vision' [T:, T:], 'text_to_vision' [:T, T:],
  'vision_to_text' [T:, :T]. All None for None. (A decoding step's mask [B, Q,
  T+R] gives 'text' [B, Q, T] and 'text_to_vision' [B, Q, R].)"""
  t = num_text
  if attention_mask is None:
    return dict(text=None, vision=None, text_to_vision=None, vision_to_text=None)
  return dict(text=attention_mask[:, :t, :t], vision=attention_mask[:, t:, t:],
              text_to_vision=attention_mask[:, :t, t:],
              vision_to_text=attention_mask[:, t:, :t])


def attend(query: jax.Array, key: jax.Array, value: jax.Array,
           key_mask: jax.Array | None, *, impl: str = 'xla',
           dropout_rate: float = 0.0, deterministic: bool = True,
           dropout_rng: jax.Array | None = None,
           return_probs: bool = False,
           attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Scaled dot-product attention over heads.

  Args:
    query: [B, T, N, D]; key, value: [B, S, N, D].
    key_mask: [B, S], nonzero where the key is real (None: all real).
    impl: 'xla', 'cudnn' or 'auto' (see `resolve_attention_impl`).
    dropout_rate: dropout on the attention probabilities (training only).
    return_probs: take the explicit path and also return probabilities [B, N, T, S].
    attention_mask: [B, T, S] (B may be 1), nonzero where query t may attend to
      key s; ANDed with `key_mask` and broadcast over heads. A query left with no
      key gets a zero context (and zero probabilities). None: `key_mask` alone,
      with exactly the outputs it gives.

  The fused kernels have no dropout on probabilities, so training with
  `dropout_rate > 0` takes the explicit path; both paths give the same outputs.
  The fused path passes the combined mask as a boolean [B, 1, T, S].

  Returns:
    (context [B, T, N, D], probs [B, N, T, S] float32 or None).
  """
  mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
  has_key = None  # [B, 1, T]: whether query t has any key left (full masks only)
  if attention_mask is not None:
    shape = (query.shape[1], key.shape[1])
    if attention_mask.ndim != 3 or tuple(attention_mask.shape[1:]) != shape:
      raise ValueError(f'attention_mask must be [B, {shape[0]}, {shape[1]}] (queries, keys), '
                       f'got {tuple(attention_mask.shape)}')
    full = attention_mask.astype(bool)[:, None, :, :]
    mask = full if mask is None else jnp.logical_and(mask, full)
    has_key = jnp.any(mask, axis=-1)
  use_dropout = dropout_rate > 0.0 and not deterministic
  if not (return_probs or use_dropout):
    impl_name = resolve_attention_impl(impl, query.dtype)
    if mask is not None and (impl_name == 'cudnn' or has_key is not None):
      # cuDNN takes a boolean mask broadcastable to [B, N, T, S] in full.
      mask = jnp.broadcast_to(mask, (query.shape[0], 1, query.shape[1], key.shape[1]))
    context = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                           implementation=impl_name)
    if has_key is not None:
      context = jnp.where(has_key[:, 0, :, None, None], context,
                          jnp.zeros((), context.dtype))
    return context, None
  # Scores, scale and softmax in float32 whatever the compute dtype, as
  # jax.nn.dot_product_attention's XLA path computes them.
  scale = np.float32(1.0 / np.sqrt(query.shape[-1]))
  scores = jnp.einsum('btnd,bsnd->bnts', query, key, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs32 = jax.nn.softmax(scores, axis=-1)
  if has_key is not None:
    probs32 = jnp.where(has_key[..., None], probs32, 0.0)
  probs = probs32.astype(query.dtype)
  kept = probs
  if use_dropout:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    kept = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(probs.dtype)
  context = jnp.einsum('bnts,bsnd->btnd', kept, value)
  return context, probs32


class Attention(nn.Module):
  """BERT attention block: Q from `x`, K/V from `context`, output dense, residual LN.

  `hidden` is the width of Q/K/V (N heads x D); `out_features` defaults to x's width.
  Submodules: query, key, value, output, output_norm.
  """
  num_heads: int
  hidden: int
  out_features: int | None = None
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  attention_impl: str = 'xla'
  residual: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.hidden % self.num_heads:
      raise ValueError(f'hidden {self.hidden} is not divisible by num_heads {self.num_heads}')

  def project(self, x: jax.Array, name: str) -> jax.Array:
    """[B, T, E] -> [B, T, N, D]."""
    return HeadsDense(self.num_heads, self.hidden // self.num_heads, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)(x)

  def cached_keys_values(self, context: jax.Array | None, decoding: Decoding
                         ) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, S, N, D] through the 'cache' collection: stored
    whole by the prefill; in a step, read back (`context` None: a stream
    computed once) or updated with the new positions' (`context` [B, Q, C], the
    new tokens) at `decoding.index`."""
    if not decoding.step:
      key, value = self.project(context, 'key'), self.project(context, 'value')
      self.variable('cache', 'cached_key', lambda: key).value = key
      self.variable('cache', 'cached_value', lambda: value).value = value
      return key, value
    if not self.has_variable('cache', 'cached_key'):
      raise ValueError(f'{self.path}: a decoding step found no cached keys; run the '
                       'prefill (Decoding.prefill()) with mutable=["cache"] first')
    cached_key = self.variable('cache', 'cached_key')
    cached_value = self.variable('cache', 'cached_value')
    if context is not None:
      for cached, new in ((cached_key, self.project(context, 'key')),
                          (cached_value, self.project(context, 'value'))):
        cached.value = jax.lax.dynamic_update_slice_in_dim(
            cached.value, new.astype(cached.value.dtype), decoding.index, axis=1)
    return cached_key.value, cached_value.value

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None,
               context_mask: jax.Array | None, deterministic: bool = True,
               return_probs: bool = False, attention_mask: jax.Array | None = None,
               decoding: Decoding | None = None) -> tuple[jax.Array, jax.Array | None]:
    """x: [B, T, E]; context: [B, S, C]; context_mask: [B, S]; attention_mask:
    [B, T, S] or None (see `attend`) -> ([B, T, out], probs [B, N, T, S] float32
    or None).

    decoding: the KV cache (`Decoding`; module docstring). In a step, `context`
    is the new tokens [B, Q, C] (self-attention: written into the cached keys)
    or None (the cached keys of a stream that is not recomputed); S, the
    masks' key length, is then the cached one.
    """
    query = self.project(x, 'query')
    if decoding is None:
      key, value = self.project(context, 'key'), self.project(context, 'value')
    else:
      key, value = self.cached_keys_values(context, decoding)
    dropout_rng = None
    if self.attention_dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng('dropout')
    heads, probs = attend(query, key, value, context_mask, impl=self.attention_impl,
                          dropout_rate=self.attention_dropout_rate,
                          deterministic=deterministic, dropout_rng=dropout_rng,
                          return_probs=return_probs, attention_mask=attention_mask)
    heads = constrain(heads, ('batch', 'length', 'heads', 'kv'))
    out = HeadsDense(self.num_heads, self.hidden // self.num_heads,
                     self.out_features or x.shape[-1], dtype=self.dtype,
                     param_dtype=self.param_dtype, name='output')(heads)
    out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
    if self.residual:
      out = out + x
    out = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='output_norm')(out)
    return out, probs


class FeedForward(nn.Module):
  """BERT FFN: dense -> GELU -> dense -> dropout -> LN(x + .). Submodules:
  intermediate, output, output_norm."""
  intermediate_size: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: [B, T, E] -> [B, T, E]."""
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = gelu(dense(self.intermediate_size, ('embed', 'mlp'), name='intermediate')(x))
    h = constrain(h, ('batch', 'length', 'mlp'))
    h = dense(x.shape[-1], ('mlp', 'embed'), name='output')(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='output_norm')(h + x)


class TransformerLayer(nn.Module):
  """A BERT encoder layer: self-attention block then FFN block."""
  num_heads: int
  intermediate_size: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool = True,
               return_probs: bool = False, attention_mask: jax.Array | None = None,
               decoding: Decoding | None = None) -> tuple[jax.Array, jax.Array | None]:
    """x: [B, T, E]; mask: [B, T] key mask; attention_mask: [B, T, T] or None
    (ANDed with `mask`, see `attend`) -> ([B, T, E], probs [B, N, T, T] float32
    or None). decoding: the KV cache (`Attention`); in a step x is [B, Q, E] and
    the masks' keys are the cached T."""
    x, probs = Attention(
        self.num_heads, x.shape[-1], dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name='attention')(
            x, x, mask, deterministic, return_probs, attention_mask, decoding)
    x = FeedForward(self.intermediate_size, self.dropout_rate, dtype=self.dtype,
                    param_dtype=self.param_dtype, name='ffn')(x, deterministic)
    return constrain(x, ('batch', 'length', 'embed')), probs


class _StackStep(nn.Module):
  """One step of a scanned stack: a `layer_cls(**layer_kwargs)` layer (submodule
  `layer_name`, its first layer's name) on the carry. See `layer_stack`."""
  layer_cls: Any
  layer_kwargs: Any
  layer_name: str
  deterministic: bool
  return_probs: bool
  remat: bool
  after_each: Callable[[Any], Any] | None

  @nn.compact
  def __call__(self, carry: Any, masks: Any, rest: tuple[Any, ...]) -> tuple[Any, Any]:
    layer = maybe_remat(self.layer_cls, self.remat)(**self.layer_kwargs, name=self.layer_name)
    carry, probs = layer(carry, masks, self.deterministic, self.return_probs, *rest)
    return (carry if self.after_each is None else self.after_each(carry)), probs


def scanned(step_cls: type[nn.Module], count: int) -> type[nn.Module]:
  """`step_cls` (called as (carry, masks, rest) -> (carry, outputs)) run `count`
  times by `nn.scan`: its params and decoding cache stacked on a leading axis
  of logical name 'layers', dropout and init RNGs split per repeat, masks and
  rest the same for every repeat."""
  return nn.scan(step_cls, variable_axes={'params': 0, 'cache': 0},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=(nn.broadcast, nn.broadcast), length=count,
                 metadata_params={nn.PARTITION_NAME: 'layers'})


def layer_stack(layer_cls: type[nn.Module], layer_kwargs: dict[str, Any], count: int,
                name: str, carry: Any, masks: Any, rest: tuple[Any, ...], *,
                deterministic: bool, return_probs: bool, remat: bool, scan: bool,
                after_each: Callable[[Any], Any] | None = None, first: int = 0
                ) -> tuple[Any, list[Any]]:
  """`count` layers of one kind run in turn, in the calling module's compact method.

  Each layer is `layer_cls(**layer_kwargs)` called as `layer(carry, masks,
  deterministic, return_probs, *rest) -> (carry, probs)`, carry and probs any
  pytrees (a stream, a pair of streams; probs [B, N, Q, K] arrays, dicts or None).

  scan=False: submodules `{name}_{i}` (i = first .. first+count-1). scan=True (from
  layer 0 only, so that both layouts name the same layers): one `nn.scan`
  submodule `{name}s` holding `{name}_0`, whose params (and decoding cache) are
  those of the layers stacked on a leading axis, logical name 'layers'
  (`layers_like` converts between the layouts): XLA compiles the layer once,
  not `count` times. remat: each layer under `nn.remat`. after_each: applied to the carry
  after each layer (a sharding constraint). Returns (carry, [probs of each
  layer]).
  """
  if not scan:
    layer_cls = maybe_remat(layer_cls, remat)
    all_probs = []
    for i in range(first, first + count):
      carry, probs = layer_cls(**layer_kwargs, name=f'{name}_{i}')(
          carry, masks, deterministic, return_probs, *rest)
      carry = carry if after_each is None else after_each(carry)
      all_probs.append(probs)
    return carry, all_probs
  if first:
    raise ValueError(f'{name}: a scanned stack starts at layer 0, not {first}')
  carry, stacked = scanned(_StackStep, count)(
      layer_cls, layer_kwargs, f'{name}_0', deterministic, return_probs, remat, after_each,
      name=f'{name}s')(carry, masks, rest)
  return carry, [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(count)]


_LAYER_NAME = re.compile(r'^(.+)_(\d+)$')


def _is_stack(name: str, subtree: Any) -> bool:
  """A scanned stack: `{...}s` holding only entries `{prefix}_{first}`."""
  return (name.endswith('s') and isinstance(subtree, dict) and bool(subtree)
          and all(_LAYER_NAME.match(k) and isinstance(v, dict) for k, v in subtree.items()))


def _stack_members(stack: dict[str, Any]) -> dict[str, list[str]]:
  """Each entry `{prefix}_{first}` of a scanned stack -> the per-layer names its
  rows hold: row i is layer `first + i * stride`, stride being the number of the
  stack's entries of that prefix (a repeated block of several layers of one kind)."""
  prefixes = [_LAYER_NAME.match(k).group(1) for k in stack]
  members = {}
  for key, value in stack.items():
    prefix, first = _LAYER_NAME.match(key).groups()
    rows = jax.tree.leaves(value)[0].shape[0]
    members[key] = [f'{prefix}_{int(first) + i * prefixes.count(prefix)}' for i in range(rows)]
  return members


def has_scanned_stack(params: Any) -> bool:
  """Whether a params tree (or its metadata) holds a scanned stack (`layer_stack`)."""
  return isinstance(params, dict) and any(
      _is_stack(k, v) or has_scanned_stack(v) for k, v in params.items())


def unstacked_layers(params: Any) -> Any:
  """`params` (any nesting of dicts) in the per-layer layout: every scanned
  stack (`{name}s` of stacked `{prefix}_{first}` entries, `_stack_members`)
  becomes its per-layer entries. Other entries are kept."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if not _is_stack(key, value):
      out[key] = unstacked_layers(value)
      continue
    for member, names in _stack_members(value).items():
      out.update({name: jax.tree.map(lambda a, i=i: a[i], value[member])
                  for i, name in enumerate(names)})
  return out


def layers_like(params: Any, like: Any) -> Any:
  """`params` (per-layer or scanned layout) in the layout of `like` (a tree of
  the same model, e.g. its abstract params): the per-layer entries of every
  stack that `like` holds scanned are stacked on a leading axis (`layer_stack`);
  the others stay per layer. A checkpoint of either layout thus loads into a
  model of either."""
  params = unstacked_layers(params)

  def restack(tree: Any, template: Any) -> Any:
    if not isinstance(tree, dict) or not isinstance(template, dict):
      return tree
    out, taken = {}, set()
    for key, value in template.items():
      if _is_stack(key, value):
        stack = {}
        for member, names in _stack_members(value).items():
          if all(n in tree for n in names):
            stack[member] = jax.tree.map(lambda *a: np.stack(a), *(
                restack(tree[n], value[member]) for n in names))
            taken.update(names)
        if stack:
          out[key] = stack
      elif key in tree:
        out[key] = restack(tree[key], value)
    out.update({k: v for k, v in tree.items() if k not in out and k not in taken})
    return out

  return restack(params, like)


def joint_layers(owner: nn.Module, x: jax.Array, mask: jax.Array, deterministic: bool,
                 return_attention: bool, attention_mask: jax.Array | None,
                 decoding: Decoding | None) -> tuple[jax.Array, dict[str, jax.Array | None]]:
  """A single-stream design's stack, called in `owner`'s compact method (its
  submodules `layer_{i}`, or `layers` scanned; `layer_stack`), from owner's
  num_layers, num_heads, intermediate_size, dropout_rate, attention_dropout_rate,
  attention_impl, dtype, param_dtype, remat and scan_layers: x [B, S, H] (a
  decoding step's: the new tokens), mask [B, S'] the keys -> ([B, S, H],
  {'joint/layer_i': probs or None}).
  """
  layer_kwargs = dict(
      num_heads=owner.num_heads, intermediate_size=owner.intermediate_size,
      dropout_rate=owner.dropout_rate, attention_dropout_rate=owner.attention_dropout_rate,
      attention_impl=owner.attention_impl, dtype=jnp.dtype(owner.dtype),
      param_dtype=jnp.dtype(owner.param_dtype))
  # The cache is written inside the layers: no remat around them when decoding.
  x, probs = layer_stack(TransformerLayer, layer_kwargs, owner.num_layers, 'layer', x, mask,
                         (attention_mask, decoding), deterministic=deterministic,
                         return_probs=return_attention,
                         remat=owner.remat and decoding is None, scan=owner.scan_layers)
  return x, {attention_key('joint', i): p for i, p in enumerate(probs)}


class TextEmbeddings(nn.Module):
  """BERT text embeddings: word + position + token type, then LN and dropout.

  Submodules: word_embeddings, position_embeddings, token_type_embeddings, norm.
  Returns (embeddings [B, T, E], word table [V', E] for tied heads), V' being
  `padded_vocab_size(vocab_size)`.
  """
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None, deterministic: bool = True,
               extra_word_embeddings: jax.Array | None = None,
               extra_token_type_embeddings: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """input_ids: [B, T] -> ([B, T, E], [V', E]).

    extra_word_embeddings [K, E], extra_token_type_embeddings [K', E]: rows past
    the word and token type tables that input_ids (ids V' .. V' + K - 1) and
    token_type_ids may index (`Embed`'s extra_rows); the returned table is the
    word table alone.
    """
    embed = functools.partial(Embed, dtype=self.dtype, param_dtype=self.param_dtype)
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[1])[None, :]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    words, table = embed(padded_vocab_size(self.vocab_size), self.hidden_size,
                         name='word_embeddings')(
        input_ids, extra_word_embeddings)
    positions, _ = embed(self.max_position_embeddings, self.hidden_size,
                         ('positions', 'embed'), name='position_embeddings')(position_ids)
    types, _ = embed(self.type_vocab_size, self.hidden_size, ('types', 'embed'),
                     name='token_type_embeddings')(token_type_ids, extra_token_type_embeddings)
    x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(
        words + positions + types)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return constrain(x, ('batch', 'length', 'embed')), table


class Pooler(nn.Module):
  """Dense + activation on position 0: [B, T, E] -> [B, out]."""
  features: int
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Dense(self.features, ('embed', 'embed_out'), dtype=self.dtype,
              param_dtype=self.param_dtype, name='dense')(x[:, 0])
    return self.activation(h)


def backbone_fields(module: nn.Module, backbone_cls: type[nn.Module]) -> dict[str, Any]:
  """The values on `module` of `backbone_cls`'s dataclass fields: a pretraining
  module (which has the backbone's fields) builds its `backbone` from these."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(backbone_cls)
          if f.name not in ('parent', 'name')}


def check_inputs(input_ids: jax.Array, region_feats: jax.Array, *, feature_dim: int,
                 max_position_embeddings: int) -> None:
  """Errors naming the config field when inputs do not fit the model config."""
  if region_feats.shape[-1] != feature_dim:
    raise ValueError(f'region_feats has feature dim {region_feats.shape[-1]} but the model '
                     f'config says feature_dim={feature_dim}')
  if input_ids.shape[1] > max_position_embeddings:
    raise ValueError(f'input_ids has length {input_ids.shape[1]} > '
                     f'max_position_embeddings={max_position_embeddings}')


def maybe_remat(layer_cls: type[nn.Module], remat: bool) -> type[nn.Module]:
  """Wraps a layer class in `nn.remat` (recompute activations in backward) if asked.

  Call the layer with all arguments positional: `deterministic` and
  `return_probs` (positions 3 and 4 counting self) are static; an attention mask
  after them (position 5) is traced.
  """
  return nn.remat(layer_cls, static_argnums=(3, 4)) if remat else layer_cls
