"""Pretraining as a task: the design's pretraining model, the caption (and
vqa) tables' image-text pairs, and the design's recipe of objectives
(`vlpjax.objectives.pretraining`).

The task interface (`vlpjax.tasks`): `prepare`, `make_model`,
`make_train_iterator`, `objectives`, `objective_for_step`, `make_inputs`,
`compute_losses`, `flops_per_example`, `make_evaluators`.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlpjax import flops
from vlpjax.data import examples, input_pipeline, tables, tokenizer
from vlpjax.models import get_design, get_model
from vlpjax.objectives import pretraining

Batch = Mapping[str, jax.Array]


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the config against the data and sets the vocabulary's token ids;
  returns the config the run uses."""
  info = tables.dataset_info(config.data)
  check_against_data(config, info)
  return with_vocab_token_ids(config, tokenizer.read_vocab(info['vocab_file']))


def check_against_data(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> None:
  """Checks the model config against `tables.dataset_info`: feature width,
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
                       f'{tables.table_name(config.data, "images")!r} has {what} up to '
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
  """Files inference needs beyond the vocabulary: the QA head's answers (image-QA
  pretraining), which a fine-tuned head may start from."""
  return {'answers.txt': tables.answer_vocab(config.data)} if config.data.qa else {}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Heads start as initialised (or as `init.source` gave them)."""
  del config, abstract_params
  return params


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
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable global batches of image-text pairs. Where only matching
  sees negatives (UNITER), batch b has them only if step b's task does
  (`pretraining.draws_negatives`); with `pretrain.first_stage_sentences='captions'`
  the first stage's batches show captions only (`pretraining.captions_only`)."""
  negatives_at = captions_only_at = None
  if get_design(config.model.name).recipe.positives_only:
    negatives_at = functools.partial(pretraining.draws_negatives, config.model.name, config)
  if config.pretrain.first_stage_sentences == 'captions':
    captions_only_at = functools.partial(pretraining.captions_only, config)
  return input_pipeline.make_pretraining_iterator(
      config.data, config.model.name, global_batch_size=config.train.global_batch_size,
      seed=config.seed, mesh=mesh, data_axes=tuple(config.mesh.data_axes),
      negatives_at=negatives_at, captions_only_at=captions_only_at)


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """The static objectives the step compiles (`pretraining.tasks_for`)."""
  return list(pretraining.tasks_for(config.model.name, config))


def objective_for_step(config: ml_collections.ConfigDict, names: list[str], step: int) -> str:
  """The objective of `step` (`pretraining.task_for_step`), one of `names`."""
  del names  # objectives(config)
  return pretraining.task_for_step(config.model.name, config, step)


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
                      input_specs: Mapping[str, jax.ShapeDtypeStruct], objective: str) -> float:
  """Model FLOPs of one example of a train step of `objective`: the backbone and
  the heads of its losses, MLM at as many slots as masking gathers (`vlpjax.flops`)."""
  text_len = input_specs['input_ids'].shape[1]
  return flops.model_flops_per_example(
      config.model, text_len, input_specs['region_feats'].shape[1],
      pretraining.mlm_slots(config, text_len),
      components=pretraining.task_components(config.model.name, objective, config))


class ValidationLossEvaluator:
  """The pretraining losses, per objective, on a held-out split of the caption
  (and vqa) tables: every sentence once, its pair drawn as in epoch 0, masked
  with a fixed key per batch, so every evaluation sees the same inputs.

  A loss is normalised within a batch as in training (MLM over masked tokens,
  region losses over regions); the reported value is its average over batches
  weighted by their real examples (padded rows weigh 0 in every loss). With mix
  'sample' each task is evaluated on the whole split.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh):
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    self._common = common
    self.name, self.log_steps, self.batch_size = name, eval_config.log_steps, eval_config.batch_size
    self.assembler = examples.make_batch_assembler(
        config.data, get_design(config.model.name), split=eval_config.split,
        seed=config.seed if config.data.seed is None else config.data.seed)
    self.sharding = input_pipeline.batch_sharding(mesh, tuple(config.mesh.data_axes),
                                                  self.batch_size)
    self.objectives = pretraining.eval_tasks(config.model.name, config)

    def losses(params, batch, rng, objective):
      kwargs, targets = make_inputs(config, batch, rng, objective)
      outputs = model.apply({'params': params}, **kwargs, deterministic=True)
      total, named = compute_losses(config, outputs, targets, objective)
      real = jnp.sum(batch[common.MASK_KEY].astype(jnp.float32))
      if objective == pretraining.ALL:
        named = {'loss': total, **named}
      return named, real

    self._losses = {o: jax.jit(functools.partial(losses, objective=o)) for o in self.objectives}
    self._seed = config.seed

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (loss name, value) and ('count', examples)."""
    del step
    common = self._common
    sums: dict[str, float] = {}
    count = 0.0
    for objective in self.objectives:
      count = 0.0
      batches = common.eval_batches(self.assembler.num_sentences, self.batch_size,
                                    lambda indices: self.assembler(0, indices), self.sharding)
      for number, batch in enumerate(batches):
        rng = jax.random.fold_in(jax.random.key(self._seed), number)
        named, real = self._losses[objective](params, batch, rng)
        real = float(real)  # the batch is global: the same on every process
        for key, value in named.items():
          sums[key] = sums.get(key, 0.0) + float(value) * real
        count += real
    for key, value in sums.items():
      yield key, value / count
    yield 'count', count


def make_evaluators(config: ml_collections.ConfigDict, model: nn.Module,
                    mesh: jax.sharding.Mesh, workdir: str) -> list[ValidationLossEvaluator]:
  """The `config.evals` entries (type 'loss': `ValidationLossEvaluator`)."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  del workdir  # no prediction files
  evaluators = []
  for name, eval_config in common.evaluator_configs(config.evals):
    if eval_config.type != 'loss':
      raise ValueError(f'config.evals.{name}.type={eval_config.type!r}: the pretraining task '
                       "has evaluators of type 'loss'")
    evaluators.append(ValidationLossEvaluator(name, eval_config, config, model, mesh))
  return evaluators
