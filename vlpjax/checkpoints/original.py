"""Rules for the authors' original UNITER (`.pt`) and ViLBERT (`.bin`) checkpoints.

UNITER (ChenRocks/UNITER): pretrained files hold the `UniterForPretraining`
state dict (backbone keys under `uniter.`); a bare `UniterModel` state dict has
no prefix and loads into a backbone.
ViLBERT (facebookresearch/vilbert-multi-task): backbone keys under `bert.`,
heads under `cls.`; the unused `biOutput.q_dense1/q_dense2` weights are skipped
on import and absent from exports.

Tied weights appear under two keys in a PyTorch state dict (UNITER: the MLM
decoder is the word table and `feat_regress.weight` is `img_linear.weight`;
ViLBERT: the MLM decoder). The copy is accepted only if it equals its partner,
and exports write it back so a round trip gives the original keys.

A pretraining (or task) checkpoint also loads into a backbone for fine-tuning:
its head keys are then left out and logged, as `hf.import_hf` does. The
BERT-shaped parts reuse the rule helpers of `vlpjax.checkpoints.hf`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

import flax.linen as nn

from vlpjax.checkpoints import hf
from vlpjax.checkpoints import state_dict as sd
from vlpjax.checkpoints.state_dict import Rule
from vlpjax.models import uniter
from vlpjax.models import vilbert

Params = Any

UNITER_PREFIX = 'uniter.'
VILBERT_PREFIX = 'bert.'
UNITER_TIED = {'cls.predictions.decoder.weight': 'uniter.embeddings.word_embeddings.weight',
               'feat_regress.weight': 'uniter.img_embeddings.img_linear.weight'}
VILBERT_TIED = {'cls.predictions.decoder.weight': 'bert.embeddings.word_embeddings.weight'}
VILBERT_SKIP = (r'.*\.biOutput\.q_dense[12]\.(weight|bias)',)


def _with_prefix(rules: list[Rule], torch_prefix: str, path_prefix: str) -> list[Rule]:
  return [dataclasses.replace(r, torch_key=torch_prefix + r.torch_key,
                              path=f'{path_prefix}/{r.path}') for r in rules]


def uniter_rules(model_config, pretraining: bool) -> list[Rule]:
  """Rules for `UniterForPretraining` (pretraining=True, backbone keys under
  `uniter.`) or a bare `UniterModel` state dict (False), tied copies excluded."""
  backbone = [
      # embeddings, layers, pooler
      *hf.bert_rules(uniter.bert_text_paths(model_config), model_config.vocab_size),
      *sd.linear_rules('img_embeddings.img_linear', 'region_embeddings/feature_projection'),
      *sd.layer_norm_rules('img_embeddings.img_layer_norm', 'region_embeddings/feature_norm'),
      *sd.linear_rules('img_embeddings.pos_linear', 'region_embeddings/location_projection'),
      *sd.layer_norm_rules('img_embeddings.pos_layer_norm', 'region_embeddings/location_norm'),
      Rule('img_embeddings.mask_embedding.weight', 'region_embeddings/mask_embedding'),
      *sd.layer_norm_rules('img_embeddings.LayerNorm', 'region_embeddings/norm'),
  ]
  if not pretraining:
    return backbone
  return [
      *_with_prefix(backbone, UNITER_PREFIX, 'backbone'),
      Rule('cls.predictions.bias', 'mlm/bias', vocab_rows=model_config.vocab_size),
      *sd.linear_rules('cls.predictions.transform.dense', 'mlm/transform/dense'),
      *sd.layer_norm_rules('cls.predictions.transform.LayerNorm', 'mlm/transform/norm'),
      *sd.linear_rules('itm_output', 'itm'),
      *sd.linear_rules('feat_regress.net.0', 'mrfr_transform/dense'),
      *sd.layer_norm_rules('feat_regress.net.2', 'mrfr_transform/norm'),
      Rule('feat_regress.bias', 'mrfr_bias'),
      *sd.linear_rules('region_classifier.net.0', 'mrc/transform/dense'),
      *sd.layer_norm_rules('region_classifier.net.2', 'mrc/transform/norm'),
      *sd.linear_rules('region_classifier.net.3', 'mrc/decoder'),
  ]


def vilbert_rules(model_config, pretraining: bool) -> list[Rule]:
  """Rules for `BertForMultiModalPreTraining` (pretraining=True, backbone keys
  under `bert.`) or a bare ViLBERT `BertModel` (False); q_dense and tied copies
  excluded."""
  backbone = [
      # Text embeddings and layers (the ReLU text pooler is not BERT's).
      *hf.bert_rules(vilbert.bert_text_paths(model_config), model_config.vocab_size,
                     with_pooler=False),
      *sd.linear_rules('v_embeddings.image_embeddings', 'region_embeddings/feature_projection'),
      *sd.linear_rules('v_embeddings.image_location_embeddings',
                       'region_embeddings/location_projection'),
      *sd.layer_norm_rules('v_embeddings.LayerNorm', 'region_embeddings/norm'),
      *[rule for i in range(model_config.v_num_layers)
        for rule in hf.transformer_layer_rules(f'encoder.v_layer.{i}', f'vision_layer_{i}')],
      *[rule for k in range(len(model_config.v_biattention_id))
        for rule in _co_layer_rules(f'encoder.c_layer.{k}', f'co_layer_{k}')],
      *sd.linear_rules('t_pooler.dense', 'text_pooler/dense'),
      *sd.linear_rules('v_pooler.dense', 'vision_pooler/dense'),
  ]
  if not pretraining:
    return backbone
  return [
      *_with_prefix(backbone, VILBERT_PREFIX, 'backbone'),
      Rule('cls.predictions.bias', 'mlm/bias', vocab_rows=model_config.vocab_size),
      *sd.linear_rules('cls.predictions.transform.dense', 'mlm/transform/dense'),
      *sd.layer_norm_rules('cls.predictions.transform.LayerNorm', 'mlm/transform/norm'),
      *sd.linear_rules('cls.bi_seq_relationship', 'alignment'),
      *sd.linear_rules('cls.imagePredictions.transform.dense', 'region_head/transform/dense'),
      *sd.layer_norm_rules('cls.imagePredictions.transform.LayerNorm',
                           'region_head/transform/norm'),
      *sd.linear_rules('cls.imagePredictions.decoder', 'region_head/decoder'),
  ]


def _co_layer_rules(p: str, path: str) -> list[Rule]:
  """ViLBERT `BertConnectionLayer`. In `biattention`, `*1` projects the image
  stream and `*2` the text stream; `biOutput.dense1/LayerNorm1` finish the image
  queries' context (our vision_to_text_attention) and `dense2/LayerNorm2` the
  text queries' (text_to_vision_attention)."""
  bi, out = f'{p}.biattention', f'{p}.biOutput'
  rules = []
  for direction, query, key_value, output in (('vision_to_text', 1, 2, 1),
                                              ('text_to_vision', 2, 1, 2)):
    attention = f'{path}/{direction}_attention'
    rules += [*sd.linear_rules(f'{bi}.query{query}', f'{attention}/query'),
              *sd.linear_rules(f'{bi}.key{key_value}', f'{attention}/key'),
              *sd.linear_rules(f'{bi}.value{key_value}', f'{attention}/value'),
              *sd.linear_rules(f'{out}.dense{output}', f'{attention}/output'),
              *sd.layer_norm_rules(f'{out}.LayerNorm{output}', f'{attention}/output_norm')]
  return (rules + hf.ffn_rules(f'{p}.v_intermediate', f'{p}.v_output', f'{path}/vision_ffn') +
          hf.ffn_rules(f'{p}.t_intermediate', f'{p}.t_output', f'{path}/text_ffn'))


def _import(model_config, path: str | os.PathLike | sd.StateDict, target: Params, *,
            rules_fn: Callable[..., list[Rule]], prefix: str, tied: Mapping[str, str],
            skip: tuple[str, ...] = ()) -> Params:
  """Shared import: matches the backbone prefix to the target, checks and drops
  tied copies, then imports strictly."""
  target = nn.unbox(target)
  if set(target) == {'params'}:
    raise ValueError("pass the params (variables['params']), not the variables dict")
  target_pretraining = 'backbone' in target
  if isinstance(path, Mapping):
    state_dict, source = dict(path), 'state dict'
  else:
    state_dict, source = sd.read_state_dict(path), os.fspath(path)
  checkpoint_pretraining = any(k.startswith(prefix) for k in state_dict)
  if target_pretraining and not checkpoint_pretraining:
    raise sd.not_a_pretraining_checkpoint(source, state_dict, prefix)
  if checkpoint_pretraining:
    state_dict = hf.drop_tied(state_dict, tied, source)
  if checkpoint_pretraining and not target_pretraining:
    # Fine-tuning from a pretraining (or task) checkpoint: keep the backbone only.
    heads = sorted(k for k in state_dict if not k.startswith(prefix))
    logging.info('%s: loading the backbone only; leaving out %d head keys: %s', source,
                 len(heads), heads)
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return sd.import_params(state_dict, rules_fn(model_config, target_pretraining), target,
                          skip=skip, source=source)


def import_uniter(model_config, path: str | os.PathLike | sd.StateDict, target: Params
                  ) -> Params:
  """Loads an original UNITER checkpoint into params shaped like `target`.

  Args:
    model_config: configs/uniter.py's model config.
    path: a `.pt` file (or `.npz`/`.safetensors`, or an already-read state dict)
      holding a `UniterForPretraining` (or task model) state dict, keys under
      `uniter.`, or a bare `UniterModel` state dict.
    target: params (or `jax.eval_shape` structs, boxed or not) of the backbone or
      of the pretraining model (which has a 'backbone' entry). A pretraining
      checkpoint loads into a backbone with its heads left out (logged).

  Raises:
    CheckpointMismatchError: missing/unexpected keys, shapes that do not fit, a
      bare backbone for a pretraining target, or tied copies that differ.
  """
  return _import(model_config, path, target, rules_fn=uniter_rules, prefix=UNITER_PREFIX,
                 tied=UNITER_TIED)


def import_vilbert(model_config, path: str | os.PathLike | sd.StateDict, target: Params
                   ) -> Params:
  """Loads an original ViLBERT checkpoint (`pytorch_model*.bin`, `.npz`,
  `.safetensors` or a state dict; `BertForMultiModalPreTraining`/task model with
  keys under `bert.`, or a bare `BertModel`) into params shaped like `target`,
  as `import_uniter` does. The unused q_dense weights are skipped."""
  return _import(model_config, path, target, rules_fn=vilbert_rules, prefix=VILBERT_PREFIX,
                 tied=VILBERT_TIED, skip=VILBERT_SKIP)


def export_uniter(model_config, params: Params) -> sd.StateDict:
  """params -> the original UNITER state dict (tied copies included)."""
  return _export(params, uniter_rules, model_config, UNITER_TIED)


def export_vilbert(model_config, params: Params) -> sd.StateDict:
  """params -> the original ViLBERT state dict, without the unused q_dense
  weights (the original's `from_pretrained` loads it, reporting them missing)."""
  return _export(params, vilbert_rules, model_config, VILBERT_TIED)


def _export(params: Params, rules_fn: Callable[..., list[Rule]], model_config,
            tied: Mapping[str, str]) -> sd.StateDict:
  params = nn.unbox(params)
  pretraining = 'backbone' in params
  state_dict = sd.export_state_dict(params, rules_fn(model_config, pretraining))
  if pretraining:
    for copy, partner in tied.items():
      state_dict[copy] = state_dict[partner].copy()
  return state_dict
