"""The backbone contract shared by the four designs (see `vlpjax.models.layers`).

An optional full attention mask [B, T+R, T+R] over [text; regions], ANDed with
the key masks, and attention probabilities under one schema,
`outputs['attention'][f'{stream}/layer_{i}']` -> float32 [B, heads, Q, K].
Every design at its 'tiny' config, dropout off.
"""
import functools
import importlib
import re

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.models import get_model
from vlpjax.models import layers

DESIGNS = ('visualbert', 'vilbert', 'lxmert', 'uniter')
LOC_DIM = dict(visualbert=4, vilbert=5, lxmert=4, uniter=7)
B, T, R, P = 2, 6, 4, 2
TEXT_LENGTHS, REGION_COUNTS = (6, 4), (4, 3)  # example 1 has padded text and regions
OUTPUTS = ('text', 'vision', 'pooled')
INPUTS = ('input_ids', 'text_mask', 'region_feats', 'region_loc', 'region_mask')


def tiny_config(name):
  config = importlib.import_module(f'configs.{name}').model_config('tiny')
  config.dropout_rate = 0.0
  config.attention_dropout_rate = 0.0
  return config


def make_inputs(config, name, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  text_mask = np.arange(T)[None, :] < np.array(TEXT_LENGTHS)[:, None]
  region_mask = np.arange(R)[None, :] < np.array(REGION_COUNTS)[:, None]
  input_ids = np.asarray(jax.random.randint(keys[0], (B, T), 5, config.vocab_size)) * text_mask
  return dict(
      input_ids=jnp.asarray(input_ids, jnp.int32), text_mask=jnp.asarray(text_mask, jnp.int32),
      region_feats=jax.random.normal(keys[1], (B, R, config.feature_dim)),
      region_loc=jax.random.uniform(keys[2], (B, R, LOC_DIM[name])),
      region_mask=jnp.asarray(region_mask, jnp.int32))


def seq2seq_mask(batch=B):
  """Captioning's mask: regions see regions only; text sees regions and earlier text."""
  mask = np.zeros((T + R, T + R), bool)
  mask[:T, :T] = np.tril(np.ones((T, T), bool))
  mask[:, T:] = True
  return jnp.asarray(np.broadcast_to(mask, (batch, T + R, T + R)))


def key_mask(inputs):
  """[B, T+R] real keys of [text; regions]."""
  return np.concatenate([inputs['text_mask'], inputs['region_mask']], 1).astype(bool)


class Design:
  """A design's tiny backbone and pretraining model, their params, and runners."""

  def __init__(self, name):
    self.name = name
    self.config = tiny_config(name)
    self.backbone = get_model(self.config, pretraining=False)
    self.pretraining = get_model(self.config, pretraining=True)
    self.inputs = make_inputs(self.config, name)
    self.mlm_positions = jnp.tile(jnp.arange(1, P + 1)[None], (B, 1))
    self.params = nn.meta.unbox(self.pretraining.init(
        jax.random.key(1), *(self.inputs[k] for k in INPUTS), self.mlm_positions))['params']
    self.backbone_params = self.params['backbone']

  @functools.lru_cache(maxsize=None)
  def _apply(self, pretraining, return_attention, masked):
    model = self.pretraining if pretraining else self.backbone
    def run(params, args, attention_mask):
      kwargs = dict(attention_mask=attention_mask) if masked else {}
      return model.apply({'params': params}, *args, return_attention=return_attention,
                         **kwargs)
    return jax.jit(run)

  def run(self, attention_mask=None, *, pretraining=False, return_attention=False,
          **changes):
    inputs = dict(self.inputs, **changes)
    params = self.params if pretraining else self.backbone_params
    extra = (self.mlm_positions,) if pretraining else ()
    # A tuple in call order (jit would hand a dict back in sorted key order).
    args = tuple(inputs[k] for k in INPUTS) + extra
    return self._apply(pretraining, return_attention, attention_mask is not None)(
        params, args, attention_mask)


@functools.lru_cache(maxsize=None)
def get_design(name):
  return Design(name)


@pytest.fixture(scope='module', params=DESIGNS)
def design(request):
  return get_design(request.param)


def expected_attention(design):
  """{stream: (count, heads, Q, K)} of the design's tiny config."""
  c, joint = design.config, (T + R, T + R)
  shapes = dict(text=(T, T), vision=(R, R), text_to_vision=(T, R), vision_to_text=(R, T))
  if design.name in ('visualbert', 'uniter'):
    return dict(joint=(c.num_layers, c.num_heads) + joint)
  if design.name == 'lxmert':
    counts = dict(text=c.num_language_layers + c.num_cross_layers,
                  vision=c.num_relation_layers + c.num_cross_layers,
                  text_to_vision=c.num_cross_layers, vision_to_text=c.num_cross_layers)
    return {s: (counts[s], c.num_heads) + shapes[s] for s in shapes}
  co = len(c.v_biattention_id)
  counts = dict(text=(c.num_layers, c.num_heads), vision=(c.v_num_layers, c.v_num_heads),
                text_to_vision=(co, c.bi_num_heads), vision_to_text=(co, c.bi_num_heads))
  return {s: counts[s] + shapes[s] for s in shapes}


def allowed_block(stream, inputs, attention_mask):
  """[B, Q, K] bool: which keys a query of `stream` may attend to."""
  keys = key_mask(inputs)
  full = np.ones((B, T + R, T + R), bool) if attention_mask is None else np.asarray(
      attention_mask, bool)
  full = full & keys[:, None, :]
  t = slice(0, T)
  v = slice(T, T + R)
  rows, cols = dict(joint=(slice(None), slice(None)), text=(t, t), vision=(v, v),
                    text_to_vision=(t, v), vision_to_text=(v, t))[stream]
  return full[:, rows, cols]


# (a) A mask of all ones is no mask.

@pytest.mark.parametrize('return_attention', [False, True])
def test_all_ones_mask_is_no_mask(design, return_attention):
  ones = jnp.ones((B, T + R, T + R), jnp.int32)
  plain = design.run(return_attention=return_attention)
  masked = design.run(ones, return_attention=return_attention)
  for key in OUTPUTS:
    np.testing.assert_array_equal(masked[key], plain[key], err_msg=key)
  if return_attention:
    assert sorted(masked['attention']) == sorted(plain['attention'])
    for key, probs in plain['attention'].items():
      np.testing.assert_array_equal(masked['attention'][key], probs, err_msg=key)


def test_boolean_and_integer_masks_agree(design):
  mask = seq2seq_mask()
  as_bool = design.run(mask)
  as_float = design.run(mask.astype(jnp.float32))
  for key in OUTPUTS:
    np.testing.assert_array_equal(as_bool[key], as_float[key], err_msg=key)


# (b) A seq2seq mask: regions never see text, text sees regions and earlier text.

def test_seq2seq_regions_do_not_see_text(design):
  mask = seq2seq_mask()
  other_ids = (design.inputs['input_ids'] * 7 + 3) % design.config.vocab_size
  masked = design.run(mask)
  masked_other = design.run(mask, input_ids=other_ids)
  np.testing.assert_allclose(masked_other['vision'], masked['vision'], atol=1e-6, rtol=0)
  # Without the mask the regions do read the text (the check above has teeth).
  plain, plain_other = design.run(), design.run(input_ids=other_ids)
  assert np.abs(plain_other['vision'] - plain['vision']).max() > 1e-3
  # ...and with it the text still reads the regions.
  other_feats = design.inputs['region_feats'][:, ::-1]
  masked_feats = design.run(mask, region_feats=other_feats)
  assert np.abs(masked_feats['text'] - masked['text']).max() > 1e-3


@pytest.mark.parametrize('position', [0, 2])
def test_seq2seq_text_does_not_see_later_text(design, position):
  mask = seq2seq_mask()
  ids = np.asarray(design.inputs['input_ids'])
  later = ids.copy()
  later[:, position + 1:] = (later[:, position + 1:] * 5 + 11) % design.config.vocab_size
  masked = design.run(mask)
  masked_later = design.run(mask, input_ids=jnp.asarray(later))
  upto = slice(0, position + 1)
  np.testing.assert_allclose(masked_later['text'][:, upto], masked['text'][:, upto],
                             atol=1e-6, rtol=0)
  np.testing.assert_allclose(masked_later['vision'], masked['vision'], atol=1e-6, rtol=0)
  # The later positions themselves did change; without the mask so does position t.
  assert np.abs(masked_later['text'][:, position + 1:] -
                masked['text'][:, position + 1:]).max() > 1e-3
  plain, plain_later = design.run(), design.run(input_ids=jnp.asarray(later))
  assert np.abs(plain_later['text'][0, upto] - plain['text'][0, upto]).max() > 1e-3


# (c) Attention probabilities under one schema.

@pytest.mark.parametrize('masked', [False, True])
def test_attention_follows_the_schema(design, masked):
  mask = seq2seq_mask() if masked else None
  out = design.run(mask, return_attention=True)
  attention = out['attention']
  expected = expected_attention(design)
  want_keys = {layers.attention_key(s, i) for s, (n, *_) in expected.items() for i in range(n)}
  assert set(attention) == want_keys
  for key, probs in attention.items():
    stream, layer = key.split('/')
    assert stream in layers.ATTENTION_STREAMS and layer.startswith('layer_')
    assert probs.dtype == jnp.float32, key
    assert probs.shape == (B,) + expected[stream][1:], key
    allowed = allowed_block(stream, design.inputs, mask)[:, None]  # [B, 1, Q, K]
    probs = np.asarray(probs)
    np.testing.assert_array_equal(np.where(allowed, 0.0, probs), 0.0, err_msg=key)
    # A query with no key left (two-stream region queries over the text under
    # the seq2seq mask) gets all-zero probabilities.
    has_key = allowed.any(-1)
    np.testing.assert_allclose(probs.sum(-1), np.broadcast_to(has_key, probs.shape[:-1]),
                               atol=1e-5, err_msg=key)
  # Outputs are those of the fused path.
  fused = design.run(mask)
  for key in OUTPUTS:
    np.testing.assert_allclose(out[key], fused[key], atol=1e-5, err_msg=key)


def _capture_attention_calls(design, attention_mask):
  """Runs the backbone with attention probs; records every `layers.Attention`
  call as (module path, args)."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Attention) and context.method_name == '__call__':
      calls.append((context.module.path, args))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = design.backbone.apply({'params': design.backbone_params},
                                *(design.inputs[k] for k in INPUTS), return_attention=True,
                                attention_mask=attention_mask)
  return out, calls


def _recompute_probs(params, x, context, context_mask, attention_mask):
  """softmax(Q K^T / sqrt(d) + mask) from an Attention module's params and inputs."""
  q_kernel, k_kernel = params['query']['kernel'], params['key']['kernel']
  q = jnp.einsum('bte,end->btnd', x, q_kernel) + params['query']['bias']
  k = jnp.einsum('bse,end->bsnd', context, k_kernel) + params['key']['bias']
  scores = jnp.einsum('btnd,bsnd->bnts', q, k) / np.sqrt(q.shape[-1])
  allowed = np.asarray(context_mask, bool)[:, None, None, :] & np.asarray(
      attention_mask, bool)[:, None]
  probs = jax.nn.softmax(scores + np.where(allowed, 0.0, -1e9), axis=-1)
  return np.where(allowed.any(-1, keepdims=True), probs, 0.0)


@pytest.mark.parametrize('name,path,key,block', [
    ('uniter', ('layer_0', 'attention'), 'joint/layer_0', (slice(None), slice(None))),
    # LXMERT's shared cross-attention, text queries over region keys (its first call).
    ('lxmert', ('cross_layer_0', 'cross_attention'), 'text_to_vision/layer_0',
     (slice(0, T), slice(T, T + R))),
])
def test_probabilities_are_the_layers_softmax(name, path, key, block):
  design = get_design(name)
  mask = seq2seq_mask()
  out, calls = _capture_attention_calls(design, mask)
  args = next(a for p, a in calls if tuple(p) == path)
  x, context, context_mask = args[:3]
  assert args[5].shape == (B,) + tuple(np.zeros((T + R, T + R))[block].shape)
  params = design.backbone_params
  for name_ in path:
    params = params[name_]
  want = _recompute_probs(params, x, context, context_mask, mask[:, block[0], block[1]])
  np.testing.assert_allclose(out['attention'][key], want, atol=1e-6)


# (d) The pretraining wrappers pass the mask on.

def test_pretraining_passes_the_mask_through(design):
  mask = seq2seq_mask()
  pre = design.run(mask, pretraining=True, return_attention=True)
  backbone = design.run(mask, return_attention=True)
  plain = design.run(pretraining=True)
  for key in OUTPUTS:
    np.testing.assert_array_equal(pre[key], backbone[key], err_msg=key)
  assert np.abs(pre['text'] - plain['text']).max() > 1e-3
  assert sorted(pre['attention']) == sorted(backbone['attention'])
  other_ids = (design.inputs['input_ids'] * 7 + 3) % design.config.vocab_size
  pre_other = design.run(mask, pretraining=True, input_ids=other_ids)
  np.testing.assert_allclose(pre_other['vision'], pre['vision'], atol=1e-6, rtol=0)


def test_misshapen_mask_is_an_error(design):
  with pytest.raises(ValueError, match='attention_mask'):
    design.run(jnp.ones((B, T, T + R), bool))


# (e) Backbone parameter names follow one pattern: streams `text` and `vision`,
# containers `{kind}_layer_{i}`, cross-modal attention named by its direction as
# the attention schema's streams are.

_DENSE = r'(kernel|bias)'
_NORM = r'(scale|bias)'
_ATTENTION = rf'((query|key|value|output)/{_DENSE}|output_norm/{_NORM})'
_FFN = rf'((intermediate|output)/{_DENSE}|output_norm/{_NORM})'
_STREAM = r'(text|vision)'
# LXMERT's `cross_attention` is one module for both directions.
_FUSION_ATTENTION = rf'({_STREAM}_self|text_to_vision|vision_to_text|cross)_attention'
BACKBONE_PATH = re.compile(rf"""
    embeddings/((word|position|token_type)_embeddings/embedding|norm/{_NORM}
                # VisualBERT's regions join its text under one LayerNorm.
                |feature_projection/{_DENSE}|region_(position|token_type)_embeddings)
  | region_embeddings/((feature|location)_projection/{_DENSE}
                       |(feature|location)_norm/{_NORM}|norm/{_NORM}|mask_embedding)
  | ({_STREAM}_)?layer_\d+/(attention/{_ATTENTION}|ffn/{_FFN})
  | (cross|co)_layer_\d+/({_FUSION_ATTENTION}/{_ATTENTION}|{_STREAM}_ffn/{_FFN})
  | ({_STREAM}_)?pooler/dense/{_DENSE}
""", re.VERBOSE)
# The layer containers (`{kind}_layer_{i}` less the index) and poolers of each design.
LAYER_KINDS = dict(visualbert={'layer'}, uniter={'layer'},
                   vilbert={'text_layer', 'vision_layer', 'co_layer'},
                   lxmert={'text_layer', 'vision_layer', 'cross_layer'})
POOLERS = dict(visualbert={'pooler'}, uniter={'pooler'}, lxmert={'pooler'},
               vilbert={'text_pooler', 'vision_pooler'})


def test_backbone_param_names_follow_the_pattern(design):
  paths = ['/'.join(key) for key in traverse_util.flatten_dict(design.backbone_params)]
  assert [p for p in paths if not BACKBONE_PATH.fullmatch(p)] == [], design.name
  top = {p.split('/')[0] for p in paths}
  layer_names = {name for name in top if re.fullmatch(r'.*layer_\d+', name)}
  kinds = {name.rsplit('_', 1)[0] for name in layer_names}
  assert kinds == LAYER_KINDS[design.name]
  assert {name for name in top if name.endswith('pooler')} == POOLERS[design.name]
  for kind in kinds:  # each kind's layers count from 0 without gaps
    indices = sorted(int(name.rsplit('_', 1)[1]) for name in layer_names
                     if name.rsplit('_', 1)[0] == kind)
    assert indices == list(range(len(indices))), (kind, indices)


# The layer underneath: `layers.attend` with a full mask.

def _qkv(t=5, s=4, heads=2, depth=8, batch=2):
  return tuple(jax.random.normal(jax.random.key(i), (batch, n, heads, depth))
               for i, n in enumerate((t, s, s)))


def test_attend_fused_and_explicit_agree_with_a_full_mask():
  q, k, v = _qkv()
  key_mask_ = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  full = jax.random.bernoulli(jax.random.key(5), 0.6, (2, 5, 4))
  full = full.at[0, 1].set(False)  # query 1 of example 0 has no key left
  fused, none = layers.attend(q, k, v, key_mask_, attention_mask=full)
  explicit, probs = layers.attend(q, k, v, key_mask_, attention_mask=full, return_probs=True)
  assert none is None
  np.testing.assert_allclose(fused, explicit, atol=1e-6)
  allowed = np.asarray(full) & np.asarray(key_mask_, bool)[:, None, :]
  np.testing.assert_array_equal(np.where(allowed[:, None], 0.0, probs), 0.0)
  np.testing.assert_array_equal(fused[0, 1], 0.0)  # no key: zero context
  scores = jnp.einsum('btnd,bsnd->bnts', q, k) / np.sqrt(8)
  want = jax.nn.softmax(jnp.where(allowed[:, None], scores, -1e9), -1)
  want = np.where(allowed[:, None].any(-1, keepdims=True), want, 0.0)
  np.testing.assert_allclose(probs, want, atol=1e-6)


def test_attend_mask_broadcasts_over_the_batch_and_keeps_masked_keys_out_under_dropout():
  q, k, v = _qkv()
  causal = jnp.tril(jnp.ones((5, 4), bool))[None]
  fused, _ = layers.attend(q, k, v, None, attention_mask=causal)
  explicit, _ = layers.attend(q, k, v, None, attention_mask=jnp.tile(causal, (2, 1, 1)),
                              return_probs=True)
  np.testing.assert_allclose(fused, explicit, atol=1e-6)
  # Dropout path: values behind masked keys do not reach the output.
  noisy_v = v.at[:, 3].set(1e3)
  run = functools.partial(layers.attend, q, k, key_mask=None, attention_mask=causal,
                          dropout_rate=0.5, deterministic=False,
                          dropout_rng=jax.random.key(7))
  a, _ = run(value=v)
  b, _ = run(value=noisy_v)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)


def test_attention_mask_through_remat_and_bf16():
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  causal = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
  plain = layers.TransformerLayer(4, 64)
  params = plain.init(jax.random.key(1), x, mask)
  remat = layers.maybe_remat(layers.TransformerLayer, True)(4, 64)
  # Weighted by x: a LayerNorm output's plain sum is zero up to rounding.
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: (m.apply(p, x, mask, True, False, causal)[0] * x).sum()))
  (want, want_grad), (got, got_grad) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  bf16 = layers.TransformerLayer(4, 64, dtype=jnp.bfloat16)
  _, probs = jax.jit(functools.partial(bf16.apply, deterministic=True, return_probs=True,
                                       attention_mask=causal))(params, x, mask)
  assert probs.dtype == jnp.float32  # the schema's dtype under bf16 compute
  np.testing.assert_array_equal(probs[:, :, 1, 2:], 0.0)


def test_attention_key_names_a_stream():
  assert layers.attention_key('text_to_vision', 3) == 'text_to_vision/layer_3'
  with pytest.raises(ValueError, match='stream'):
    layers.attention_key('cross', 0)
