"""Pretraining as a task: the design's pretraining model, the caption (and
vqa) tables' image-text pairs, and the design's recipe of objectives
(`vlpjax.objectives.pretraining`).

The task interface (`vlpjax.tasks`): `prepare`, `make_model`,
`make_train_iterator`, `objectives`, `objective_for_step`, `make_inputs`,
`compute_losses`, `flops_per_example`, `make_evaluators`.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections

from vlpjax import flops
from vlpjax.data import pipeline, tokenizer
from vlpjax.models import get_model
from vlpjax.objectives import pretraining

Batch = Mapping[str, jax.Array]


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the config against the data and sets the vocabulary's token ids;
  returns the config the run uses."""
  info = pipeline.dataset_info(config.data)
  check_against_data(config, info)
  return with_vocab_token_ids(config, tokenizer.read_vocab(info['vocab_file']))


def check_against_data(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> None:
  """Checks the model config against `pipeline.dataset_info`: feature width,
  vocabulary, and the class/answer counts the enabled objectives predict, which
  must also cover the largest object/attribute ids of the images table (an id
  past a head's labels gives a NaN loss, not an error)."""
  model, tasks = config.model, set(config.pretrain.tasks)
  def require(field, value, what):
    if value is not None and model[field] != value:
      raise ValueError(f'config.model.{field}={model[field]} but the dataset '
                       f'{config.data.name!r} has {what} {value}; set '
                       f'--config.model.{field}={value} or use matching data')
  def covers(field, max_id, first_label, what):
    # Label of id k: first_label + k.
    if max_id is not None and model[field] < max_id + first_label + 1:
      raise ValueError(f'config.model.{field}={model[field]} is too small: the images table '
                       f'{pipeline.table_name(config.data, "images")!r} has {what} up to '
                       f'{max_id}; set --config.model.{field} to at least '
                       f'{max_id + first_label + 1} (the detector\'s label count) or use '
                       'matching data')
  require('feature_dim', info['feature_dim'], 'region feature width')
  if model.vocab_size < info['vocab_size']:
    raise ValueError(f'config.model.vocab_size={model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({info["vocab_size"]}, {info["vocab_file"]})')
  if tasks & {'region_kl', 'mrc', 'mrckl'}:
    require('num_region_classes', info['num_object_classes'],
            'detector classes (incl. background):')
    covers('num_region_classes', info['max_object_id'], 1,
           'object ids (label = id + 1, 0 being background)')
  if 'obj' in tasks:
    if info['num_object_classes'] is not None:
      require('num_object_labels', info['num_object_classes'] - 1,
              'object classes (less background):')
    covers('num_object_labels', info['max_object_id'], 0, 'object ids')
  if 'attr' in tasks:
    require('num_attr_labels', info['num_attributes'], 'attributes:')
    covers('num_attr_labels', info['max_attr_id'], 0, 'attribute ids')
  if 'qa' in tasks:
    if not config.data.qa:
      raise ValueError("config.pretrain.tasks has 'qa' but config.data.qa is False; "
                       'set --config.data.qa=True or drop the qa task')
    require('num_answers', info['num_answers'], 'answers:')


def with_vocab_token_ids(config: ml_collections.ConfigDict,
                         vocab: Mapping[str, int]) -> ml_collections.ConfigDict:
  """A copy of `config` whose `pretrain` token ids are those of `vocab`.

  The objectives default to bert-base's ids; the vocabulary in use decides.
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.pretrain.mask_token_id = vocab['[MASK]']
    config.pretrain.special_token_ids = tuple(vocab[t] for t in ('[PAD]', '[CLS]', '[SEP]'))
  if config.pretrain.random_token_min >= len(vocab):
    raise ValueError(f'config.pretrain.random_token_min={config.pretrain.random_token_min} '
                     f'leaves no word of the {len(vocab)}-token vocabulary to draw')
  return config


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """Files inference needs beyond the vocabulary: none."""
  del config
  return {}


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None) -> Any:
  """Pretraining runs have no predictor: fine-tune one (e.g. `task=vqa`)."""
  del config, step
  raise ValueError(f'{workdir} is a pretraining run: `vlpjax.load` returns the predictor '
                   "of a downstream task; fine-tune it (e.g. --config=...:small,task=vqa "
                   f'--config.init.source=workdir:{workdir}) and load that workdir')


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The design's pretraining model (backbone + pretraining heads)."""
  return get_model(config.model)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                        ) -> pipeline.PretrainingIterator:
  """Endless, resumable global batches of image-text pairs."""
  return pipeline.make_pretraining_iterator(
      config.data, config.model.name, global_batch_size=config.train.global_batch_size,
      seed=config.seed, mesh=mesh, data_axes=tuple(config.mesh.data_axes))


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """The static objectives the step compiles (`pretraining.tasks_for`)."""
  return list(pretraining.tasks_for(config.model.name, config))


def objective_for_step(config: ml_collections.ConfigDict, names: list[str], step: int) -> str:
  """The objective of `step`: sampled by ratio (mix 'sample') or the single one."""
  if len(names) == 1:
    return names[0]
  return pretraining.sample_task(config.seed, step, pretraining.task_ratios(config))


def make_inputs(config: ml_collections.ConfigDict, batch: Batch, rng: jax.Array,
                objective: str) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Masked model inputs and targets (`pretraining.make_inputs`)."""
  return pretraining.make_inputs(config.model.name, batch, rng, objective, config)


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, Any], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The objective's weighted total and named losses (`pretraining.compute_losses`)."""
  return pretraining.compute_losses(config.model.name, outputs, targets, objective, config)


def flops_per_example(config: ml_collections.ConfigDict,
                      input_specs: Mapping[str, jax.ShapeDtypeStruct]) -> float:
  """Model FLOPs of one example of a train step (`vlpjax.flops`)."""
  return flops.model_flops_per_example(config.model, input_specs['input_ids'].shape[1],
                                       input_specs['region_feats'].shape[1])


def make_evaluators(config: ml_collections.ConfigDict, model: nn.Module,
                    mesh: jax.sharding.Mesh, workdir: str) -> list[Any]:
  """The evaluators of `config.evals` (pretraining has none yet)."""
  del model, mesh, workdir
  if config.get('evals'):
    raise ValueError(f'config.evals {sorted(config.evals)}: the pretraining task has no '
                     'evaluators')
  return []
