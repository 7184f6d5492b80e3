"""HuggingFace transformers checkpoints <-> vlpjax params: LXMERT, VisualBERT, BERT.

* `import_hf` loads `LxmertModel`/`LxmertForPreTraining` or
  `VisualBertModel`/`VisualBertForPreTraining` weights (a `save_pretrained`
  directory or a weight file) into the matching vlpjax model, strictly.
  A pretraining checkpoint (keys under `lxmert.`/`visual_bert.`) also loads into
  a backbone for fine-tuning; its head keys are then left out and logged.
* `export_hf` writes params back as the HF model's `state_dict()` (tied
  duplicates included), so a round trip is exact.
* `import_bert` loads a `BertModel` (or `BertForPreTraining`) checkpoint into the
  text part of any of the four designs (each design's `bert_text_paths` says
  where), leaving every other param as it was except what the design's
  `after_bert_import` derives from BERT (VisualBERT's region position/type
  tables, copied as its `special_visual_initialize` does).

Tied weights (the MLM decoder is the word table; VisualBERT's decoder bias is
the head bias) are stored once in vlpjax: on import the duplicate key is
accepted only if it equals its partner, otherwise it is an error.
"""
from __future__ import annotations

import dataclasses
import logging

import os
import re
from typing import Any, Callable

import flax
import flax.linen as nn
import ml_collections
import numpy as np

from vlpjax.checkpoints import state_dict as sd
from vlpjax.checkpoints.state_dict import Rule
from vlpjax.models import get_design
from vlpjax.models import lxmert
from vlpjax.models import visualbert

Params = Any

# Non-parameter buffer that older transformers versions saved; never learned.
POSITION_IDS_BUFFER = r'(.*\.)?embeddings\.position_ids'
# Prefixes of the backbones' keys in the HF pretraining state dicts.
LXMERT_PREFIX = 'lxmert.'
VISUALBERT_PREFIX = 'visual_bert.'


def attention_rules(qkv_prefix: str, output_prefix: str, path: str) -> list[Rule]:
  """HF query/key/value Linears at `qkv_prefix` and output dense + LayerNorm at
  `output_prefix` <-> a `layers.Attention` at `path`."""
  rules = []
  for name in ('query', 'key', 'value'):
    rules += sd.linear_rules(f'{qkv_prefix}.{name}', f'{path}/{name}')
  return (rules + sd.linear_rules(f'{output_prefix}.dense', f'{path}/output') +
          sd.layer_norm_rules(f'{output_prefix}.LayerNorm', f'{path}/output_norm'))


def ffn_rules(intermediate_prefix: str, output_prefix: str, path: str) -> list[Rule]:
  """HF intermediate dense and output dense + LayerNorm <-> a `layers.FeedForward`."""
  return (sd.linear_rules(f'{intermediate_prefix}.dense', f'{path}/intermediate') +
          sd.linear_rules(f'{output_prefix}.dense', f'{path}/output') +
          sd.layer_norm_rules(f'{output_prefix}.LayerNorm', f'{path}/output_norm'))


def transformer_layer_rules(prefix: str, path: str) -> list[Rule]:
  """A BERT-style HF layer (`attention.self`, `attention.output`, `intermediate`,
  `output`) <-> a `layers.TransformerLayer` at `path`."""
  return (attention_rules(f'{prefix}.attention.self', f'{prefix}.attention.output',
                          f'{path}/attention') +
          ffn_rules(f'{prefix}.intermediate', f'{prefix}.output', f'{path}/ffn'))


def text_embedding_rules(prefix: str, path: str, vocab_size: int) -> list[Rule]:
  """BERT embeddings (word, position, token type, LayerNorm) <-> the same-named
  submodules of `layers.TextEmbeddings` (or VisualBERT's embeddings) at `path`;
  the word table holds `vocab_size` rows in the checkpoint (padded here)."""
  return (sd.embedding_rules(f'{prefix}.word_embeddings', f'{path}/word_embeddings',
                             vocab_size) +
          sd.embedding_rules(f'{prefix}.position_embeddings', f'{path}/position_embeddings') +
          sd.embedding_rules(f'{prefix}.token_type_embeddings',
                             f'{path}/token_type_embeddings') +
          sd.layer_norm_rules(f'{prefix}.LayerNorm', f'{path}/norm'))


def bert_rules(text_paths: dict[str, Any], vocab_size: int, *, torch_prefix: str = '',
               path_prefix: str = '', with_pooler: bool = True) -> list[Rule]:
  """HF `BertModel` keys (`embeddings.*`, `encoder.layer.i.*`, `pooler.dense.*`)
  <-> the text part named by a design's `bert_text_paths`, for a vocabulary of
  `vocab_size` (config.model.vocab_size)."""
  rules = text_embedding_rules(f'{torch_prefix}embeddings',
                               f'{path_prefix}{text_paths["embeddings"]}', vocab_size)
  for i, layer_path in enumerate(text_paths['layers']):
    rules += transformer_layer_rules(f'{torch_prefix}encoder.layer.{i}',
                                     f'{path_prefix}{layer_path}')
  if with_pooler and text_paths.get('pooler'):
    rules += sd.linear_rules(f'{torch_prefix}pooler.dense',
                             f'{path_prefix}{text_paths["pooler"]}/dense')
  return rules


def _prefixes(backbone_prefix: str, pretraining: bool) -> tuple[str, str]:
  """(torch key prefix, flax path prefix) of the backbone."""
  return (backbone_prefix, 'backbone/') if pretraining else ('', '')


def _mlm_head_rules(path: str, vocab_size: int) -> list[Rule]:
  """HF `cls.predictions` (less the tied decoder) <-> `heads.MaskedLMHead`."""
  return ([Rule('cls.predictions.bias', f'{path}/bias', vocab_rows=vocab_size)] +
          sd.linear_rules('cls.predictions.transform.dense', f'{path}/transform/dense') +
          sd.layer_norm_rules('cls.predictions.transform.LayerNorm', f'{path}/transform/norm'))


def lxmert_rules(model_config: ml_collections.ConfigDict, pretraining: bool) -> list[Rule]:
  """Rules for HF `LxmertForPreTraining` (pretraining) or `LxmertModel` keys,
  less the tied `cls.predictions.decoder.weight`."""
  key, path = _prefixes(LXMERT_PREFIX, pretraining)
  rules = bert_rules(lxmert.bert_text_paths(model_config), model_config.vocab_size,
                     torch_prefix=key, path_prefix=path)
  visual, regions = f'{key}encoder.visn_fc', f'{path}region_embeddings'
  rules += (sd.linear_rules(f'{visual}.visn_fc', f'{regions}/feature_projection') +
            sd.layer_norm_rules(f'{visual}.visn_layer_norm', f'{regions}/feature_norm') +
            sd.linear_rules(f'{visual}.box_fc', f'{regions}/location_projection') +
            sd.layer_norm_rules(f'{visual}.box_layer_norm', f'{regions}/location_norm'))
  for i in range(model_config.num_relation_layers):
    rules += transformer_layer_rules(f'{key}encoder.r_layers.{i}', f'{path}vision_layer_{i}')
  for i in range(model_config.num_cross_layers):
    torch_layer, layer = f'{key}encoder.x_layers.{i}', f'{path}cross_layer_{i}'
    # HF's one `visual_attention` serves both directions, as our `cross_attention`.
    rules += attention_rules(f'{torch_layer}.visual_attention.att',
                             f'{torch_layer}.visual_attention.output', f'{layer}/cross_attention')
    for torch_stream, stream in (('lang', 'text'), ('visn', 'vision')):
      rules += attention_rules(f'{torch_layer}.{torch_stream}_self_att.self',
                               f'{torch_layer}.{torch_stream}_self_att.output',
                               f'{layer}/{stream}_self_attention')
      rules += ffn_rules(f'{torch_layer}.{torch_stream}_inter',
                         f'{torch_layer}.{torch_stream}_output', f'{layer}/{stream}_ffn')
  if pretraining:
    rules += _mlm_head_rules('mlm_head', model_config.vocab_size)
    rules += sd.linear_rules('cls.seq_relationship', 'matched_head')
    rules += sd.linear_rules('obj_predict_head.transform.dense', 'object_head/transform/dense')
    rules += sd.layer_norm_rules('obj_predict_head.transform.LayerNorm',
                                 'object_head/transform/norm')
    for name in ('obj', 'attr', 'feat'):
      rules += sd.linear_rules(f'obj_predict_head.decoder_dict.{name}', f'object_head/{name}')
    rules += (sd.linear_rules('answer_head.logit_fc.0', 'answer_head/hidden') +
              sd.layer_norm_rules('answer_head.logit_fc.2', 'answer_head/norm') +
              sd.linear_rules('answer_head.logit_fc.3', 'answer_head/output'))
  return rules


def visualbert_rules(model_config: ml_collections.ConfigDict, pretraining: bool) -> list[Rule]:
  """Rules for HF `VisualBertForPreTraining` (pretraining) or `VisualBertModel`
  keys, less the tied `cls.predictions.decoder.{weight,bias}`."""
  key, path = _prefixes(VISUALBERT_PREFIX, pretraining)
  rules = bert_rules(visualbert.bert_text_paths(model_config), model_config.vocab_size,
                     torch_prefix=key, path_prefix=path)
  embeddings = f'{key}embeddings'
  rules += sd.linear_rules(f'{embeddings}.visual_projection',
                           f'{path}embeddings/feature_projection')
  for torch_name, name in (('visual_position_embeddings', 'region_position_embeddings'),
                           ('visual_token_type_embeddings', 'region_token_type_embeddings')):
    rules.append(Rule(f'{embeddings}.{torch_name}.weight', f'{path}embeddings/{name}'))
  if pretraining:
    rules += _mlm_head_rules('mlm_head', model_config.vocab_size)
    rules += sd.linear_rules('cls.seq_relationship', 'sentence_image_head')
  return rules


@dataclasses.dataclass(frozen=True)
class HfFormat:
  """A transformers model class's state dict layout.

  Attributes:
    backbone_prefix: prefix of the backbone's keys in the pretraining state dict.
    rules: (model config, pretraining) -> the key rules.
    tied_decoder_bias: the MLM decoder's bias is a tied copy of `cls.predictions.bias`.
  """
  backbone_prefix: str
  rules: Callable[[ml_collections.ConfigDict, bool], list[Rule]]
  tied_decoder_bias: bool = False

  def tied_keys(self, pretraining: bool) -> dict[str, str]:
    """Duplicate key -> the key it is tied to, in the pretraining state dict."""
    if not pretraining:
      return {}
    tied = {'cls.predictions.decoder.weight':
            f'{self.backbone_prefix}embeddings.word_embeddings.weight'}
    if self.tied_decoder_bias:
      tied['cls.predictions.decoder.bias'] = 'cls.predictions.bias'
    return tied


# The designs transformers implements, by `config.model.name`.
HF_FORMATS = {
    'lxmert': HfFormat(LXMERT_PREFIX, lxmert_rules),
    'visualbert': HfFormat(VISUALBERT_PREFIX, visualbert_rules, tied_decoder_bias=True),
}


def drop_tied(state_dict: sd.StateDict, tied: dict[str, str], source: str) -> sd.StateDict:
  """Removes tied duplicates after checking they equal their partners."""
  state_dict = dict(state_dict)
  for duplicate, partner in tied.items():
    if duplicate not in state_dict:
      continue  # save_pretrained writes tied weights once
    if partner not in state_dict:
      raise sd.CheckpointMismatchError(f'{source}: {duplicate} is present but its tied '
                                       f'partner {partner} is missing')
    if not np.array_equal(state_dict[duplicate], state_dict[partner]):
      raise sd.CheckpointMismatchError(
          f'{source}: {duplicate} should be tied to {partner} but the values differ '
          '(vlpjax ties them, so it cannot hold both)')
    del state_dict[duplicate]
  return state_dict


def _format(model_config: ml_collections.ConfigDict) -> HfFormat:
  name = model_config.get('name')
  if name not in HF_FORMATS:
    raise ValueError(f'HF checkpoints exist for {sorted(HF_FORMATS)}; config.model.name is '
                     f'{name!r}')
  return HF_FORMATS[name]


def import_hf(model_config: ml_collections.ConfigDict, path_or_dir: str | os.PathLike,
              target_params: Params) -> Params:
  """Loads an HF LXMERT/VisualBERT checkpoint into params shaped like `target_params`.

  Args:
    model_config: the design's model config (config.model).
    path_or_dir: a `save_pretrained` directory or a .safetensors/.bin file.
    target_params: params (or `jax.eval_shape` structs, boxed or not) of the backbone
      (`get_model(..., pretraining=False)`) or the pretraining model (has a
      'backbone' entry).

  Returns:
    A new param tree with the structure of `target_params`.

  Raises:
    CheckpointMismatchError: missing/unexpected keys, shapes that do not fit,
      a backbone-only checkpoint for a pretraining model, or tied weights that differ.
  """
  hf_format = _format(model_config)
  prefix = hf_format.backbone_prefix
  target_params = nn.unbox(target_params)
  source = os.fspath(path_or_dir)
  state_dict = sd.read_state_dict(path_or_dir)
  checkpoint_pretraining = any(k.startswith(prefix) for k in state_dict)
  target_pretraining = _is_pretraining(target_params)
  if target_pretraining and not checkpoint_pretraining:
    raise sd.not_a_pretraining_checkpoint(source, state_dict, prefix)
  state_dict = drop_tied(state_dict, hf_format.tied_keys(checkpoint_pretraining), source)
  if checkpoint_pretraining and not target_pretraining:
    # Fine-tuning from a pretraining (or QA) checkpoint: keep the backbone only.
    heads = sorted(k for k in state_dict if not k.startswith(prefix))
    logging.warning('%s: loading the backbone only; leaving out %d head keys: %s', source,
                 len(heads), heads)
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  rules = hf_format.rules(model_config, target_pretraining)
  return sd.import_params(state_dict, rules, target_params, skip=[POSITION_IDS_BUFFER],
                          source=source)


def export_hf(model_config: ml_collections.ConfigDict, params: Params) -> sd.StateDict:
  """Params -> the HF model's `state_dict()`: keys, shapes and tied duplicates."""
  hf_format = _format(model_config)
  params = nn.unbox(params)
  pretraining = _is_pretraining(params)
  state_dict = sd.export_state_dict(params, hf_format.rules(model_config, pretraining))
  for duplicate, partner in hf_format.tied_keys(pretraining).items():
    state_dict[duplicate] = state_dict[partner].copy()
  return state_dict


def import_bert(model_config: ml_collections.ConfigDict, bert_dir: str | os.PathLike,
                params: Params) -> Params:
  """Loads a BERT checkpoint into the text part of any design; the rest is kept.

  Reads a `BertModel` (keys `embeddings.*`) or `BertForPreTraining` (keys
  `bert.*`, whose `cls.*` heads are left out) checkpoint. BERT layer i goes to
  the design's `bert_text_paths(...)['layers'][i]`; BERT layers beyond those,
  and the pooler when the design has no BERT-shaped one, are left out (logged).

  Args:
    model_config: the design's model config.
    bert_dir: a `save_pretrained` directory or a weight file.
    params: the backbone params, or the pretraining params (with 'backbone').

  Returns:
    `params` with the text embeddings, text layers (and pooler) replaced, then
    passed through the design's `after_bert_import(backbone_params,
    model_config)` if it has one (VisualBERT copies the loaded position/type
    tables into its region ones).

  Raises:
    CheckpointMismatchError: too few BERT layers, or shapes that do not fit
      (vocabulary, hidden size, heads/FFN width, position or type tables).
  """
  params = nn.unbox(params)
  design = get_design(model_config.name)
  text_paths = design.bert_text_paths(model_config)
  source = os.fspath(bert_dir)
  state_dict = sd.read_state_dict(bert_dir)
  if any(k.startswith('bert.') for k in state_dict):
    heads = sorted(k for k in state_dict if not k.startswith('bert.'))
    logging.warning('%s: leaving out the BERT pretraining heads: %s', source, heads)
    state_dict = {k[len('bert.'):]: v for k, v in state_dict.items() if k.startswith('bert.')}
  path_prefix = 'backbone/' if _is_pretraining(params) else ''
  rules = bert_rules(text_paths, model_config.vocab_size, path_prefix=path_prefix)
  wanted = {r.torch_key for r in rules}
  left_out = sorted(k for k in state_dict
                    if k not in wanted and not re.fullmatch(POSITION_IDS_BUFFER, k))
  foreign = [k for k in left_out if not _beyond_design(k, len(text_paths['layers']))]
  if foreign:
    raise sd.CheckpointMismatchError(f'{source}: keys that are not BERT text weights: '
                                     f'{foreign[:20]}')
  if left_out:
    logging.warning('%s: %s takes %d BERT layers; leaving out %d keys: %s', source,
                 model_config.name, len(text_paths['layers']), len(left_out), left_out)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  target = {r.path: flat[r.path] for r in rules if r.path in flat}
  loaded = sd.import_params({k: v for k, v in state_dict.items() if k in wanted}, rules,
                            flax.traverse_util.unflatten_dict(target, sep='/'), source=source)
  flat.update(flax.traverse_util.flatten_dict(loaded, sep='/'))
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  # A design's own step once BERT is in (VisualBERT's special_visual_initialize).
  after_import = design.after_bert_import
  if after_import is not None:
    if path_prefix:
      params['backbone'] = after_import(params['backbone'], model_config)
    else:
      params = after_import(params, model_config)
  return params


def _beyond_design(bert_key: str, num_layers: int) -> bool:
  """Whether a BERT key may be left out: a layer past the design's `num_layers`
  text layers, or the pooler of a design without a BERT-shaped one."""
  layer = re.match(r'encoder\.layer\.(\d+)\.', bert_key)
  return int(layer.group(1)) >= num_layers if layer else bert_key.startswith('pooler.')


def _is_pretraining(params: Params) -> bool:
  """Whether `params` are a pretraining model's (backbone under 'backbone')."""
  if set(params) == {'params'}:
    raise ValueError("pass the params (variables['params']), not the variables dict")
  return 'backbone' in params
