"""Per-design pretraining: masking, model inputs, losses and the task mix.

The train step calls, inside `jax.jit` with `task` static:

  model_kwargs, targets = make_inputs(design, batch, rng, task, config)
  outputs = model.apply(params, **model_kwargs, ...)
  total, losses = compute_losses(design, outputs, targets, task, config)

and picks `task` outside jit: `tasks_for(design, config)` lists the tasks and
`task_for_step` picks one; with `mix = 'sample'` (UNITER) each step runs one
task drawn by `sample_task(seed, step, task_ratios(config, step))`, with
`mix = 'sum'` (LXMERT, ViLBERT, VisualBERT) every step runs the task 'all', the
sum of the losses in `config.pretrain.tasks`. A first stage
(`first_stage_steps`) draws by `first_stage_ratios` ('sample'), or sums only
the losses those ratios do not zero, as the task 'first_stage' ('sum'); with
`first_stage_sentences='captions'` its batches show captions only
(`captions_only`, read by the input pipeline).

Each design's recipe (`Design.recipe`, in `vlpjax/models/<design>.py`) names its
loss components (the names of `config.pretrain.tasks` and of the returned
`losses`), its mix, its masking and which examples each loss sees: with
`positives_only` (UNITER) every loss but matching sees matched pairs only: as
its original draws those batches from positive pairs, the pipeline draws
negatives only for the steps whose task has a matching loss (`draws_negatives`;
a negative that reaches another loss still gets weight 0); otherwise MLM and
region losses see mismatched pairs too (airsplay/lxmert#51). QA trains on matched questions only.
With `conditional_masking` (UNITER) one modality is masked per batch: text for
'mlm', regions for the region tasks, nothing for matching.

`config` is the run config: `config.model.vocab_size` and the `config.pretrain`
section (see `default_pretrain_config`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpjax.models import design as design_lib
from vlpjax.objectives import masking, matching, mlm, qa, region

Batch = Mapping[str, jax.Array]
DesignOrName = str | design_lib.Design

# The padding mask of evaluation batches (`vlpjax.evaluators.common.MASK_KEY`).
MASK_KEY = '_mask'
MATCHING_LOGITS = {'sentence_image': 'sentence_image_logits', 'alignment': 'alignment_logits',
                   'matched': 'matched_logits', 'itm': 'itm_logits'}
REGION_COMPONENTS = ('region_kl', 'obj', 'attr', 'feat', 'mrfr', 'mrc', 'mrckl')
MIXES = ('sample', 'sum')
FIRST_STAGE_SENTENCES = ('all', 'captions')
ALL = 'all'
FIRST_STAGE = 'first_stage'


def default_pretrain_config(design: DesignOrName) -> ml_collections.ConfigDict:
  """The `config.pretrain` section with the original's defaults (the design's recipe).

  Token ids default to bert-base's vocabulary ([PAD] 0, [CLS] 101, [SEP] 102,
  [MASK] 103, the same in the cased and uncased vocabularies); set them from the
  vocabulary in use.
  """
  recipe = design_lib.as_design(design).recipe
  return ml_collections.ConfigDict(dict(
      mix=recipe.mix,
      tasks=recipe.default_tasks,
      ratios=recipe.default_ratios,  # 'sample' only: relative task frequencies
      # Steps [0, first_stage_steps) draw by first_stage_ratios instead (one per
      # task; 'sum': the tasks with a nonzero one are summed), e.g. matching
      # alone until it has left chance before the masked objectives join.
      first_stage_steps=0,
      first_stage_ratios=(),
      # The first stage's sentences: 'all' of the pool, or 'captions' (with
      # `data.qa`: the questions join with image QA, as LXMERT's first epochs).
      first_stage_sentences='all',
      mask_prob=0.15,
      region_mask_prob=0.15,
      max_predictions=0,  # MLM slots per example; 0: masking.default_max_predictions(T)
      mask_token_id=103,
      special_token_ids=(0, 101, 102),  # never masked: [PAD], [CLS], [SEP]
      # Lowest id drawn as a random word (the design's; 0: the whole vocabulary).
      random_token_min=recipe.random_token_min,
      # LXMERT object/attribute losses: 'all' regions (original) or 'masked' only.
      lxmert_label_regions='all',
      loss_weights={},  # {component: weight}; defaults: the recipe's, else 1
      # Matching scores pairs whose sentence is a question too (`data.qa`), as
      # LXMERT's original; False: captions only (the embedded world's templated
      # questions fit almost any image, so their pairs cannot be judged).
      match_questions=True,
  ))


def tasks_for(design: DesignOrName, config: ml_collections.ConfigDict) -> list[str]:
  """The static tasks the train step compiles: `config.pretrain.tasks` or ['all']."""
  design = design_lib.as_design(design)
  pre = config.pretrain
  if pre.mix not in MIXES:
    raise ValueError(f'config.pretrain.mix must be one of {MIXES}, got {pre.mix!r}')
  components = design.recipe.components
  unknown = [t for t in pre.tasks if t not in components]
  if unknown or not pre.tasks:
    raise ValueError(f'config.pretrain.tasks {tuple(pre.tasks)} for {design.name}: must be a '
                     f'non-empty subset of {components}')
  if design.recipe.conditional_masking and pre.mix != 'sample':
    raise ValueError(f"config.pretrain.mix must be 'sample' for {design.name}: it masks one "
                     'modality per batch (conditional masking)')
  if pre.first_stage_steps > 0:
    task_ratios(config, 0)  # validates the first stage's ratios
  if pre.first_stage_sentences not in FIRST_STAGE_SENTENCES:
    raise ValueError(f'config.pretrain.first_stage_sentences must be one of '
                     f'{FIRST_STAGE_SENTENCES}, got {pre.first_stage_sentences!r}')
  if pre.mix == 'sum':
    return [FIRST_STAGE, ALL] if pre.first_stage_steps > 0 else [ALL]
  task_ratios(config, pre.first_stage_steps)
  return list(pre.tasks)


def eval_tasks(design: DesignOrName, config: ml_collections.ConfigDict) -> list[str]:
  """The tasks validation losses are computed for: `tasks_for` without the
  first stage, so that each loss is counted once."""
  return [t for t in tasks_for(design, config) if t != FIRST_STAGE]


def task_for_step(design: DesignOrName, config: ml_collections.ConfigDict, step: int) -> str:
  """The task of train step `step` (one of `tasks_for`, which validates the
  config once per run; this runs every step)."""
  del design  # the config names the mix and stages
  if config.pretrain.mix == 'sum':
    return FIRST_STAGE if step < config.pretrain.first_stage_steps else ALL
  return sample_task(config.seed, step, task_ratios(config, step))


def captions_only(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether train step `step`'s batch draws its sentences from the captions
  alone: in the first stage with `first_stage_sentences='captions'`."""
  pre = config.pretrain
  return pre.first_stage_sentences == 'captions' and step < pre.first_stage_steps


def draws_negatives(design: DesignOrName, config: ml_collections.ConfigDict,
                    step: int) -> bool:
  """Whether train step `step`'s batch needs mismatched pairs: always, unless
  the recipe's losses other than matching see positives only, then only when
  the step's task has a matching loss."""
  design = design_lib.as_design(design)
  if not design.recipe.positives_only:
    return True
  task = task_for_step(design, config, step)
  return any(c in MATCHING_LOGITS for c in task_components(design, task, config))


def task_ratios(config: ml_collections.ConfigDict, step: int) -> dict[str, float]:
  """{task: ratio} at `step` from `config.pretrain.tasks` and `.ratios`, or
  `.first_stage_ratios` before `.first_stage_steps` (mix 'sample')."""
  pre = config.pretrain
  field = 'first_stage_ratios' if step < pre.first_stage_steps else 'ratios'
  ratios = tuple(pre[field])
  if len(ratios) != len(pre.tasks) or any(r < 0 for r in ratios) or not any(ratios):
    raise ValueError(f'config.pretrain.{field} {ratios} must give one non-negative '
                     f'ratio per task of config.pretrain.tasks {tuple(pre.tasks)}, not all 0')
  return dict(zip(pre.tasks, (float(r) for r in ratios)))


def sample_task(seed: int, step: int, ratios: Mapping[str, float]) -> str:
  """UNITER-style task mix: the task for `step`, drawn by ratio; a pure function
  of (seed, step, ratios), independent of the ratios' order."""
  names = sorted(ratios)
  probs = np.asarray([ratios[n] for n in names], np.float64)
  rng = np.random.default_rng((int(seed), int(step)))
  return names[rng.choice(len(names), p=probs / probs.sum())]


def make_inputs(design: DesignOrName, batch: Batch, rng: jax.Array, task: str,
                config: ml_collections.ConfigDict) -> tuple[dict[str, jax.Array],
                                                            dict[str, jax.Array]]:
  """Masks the batch for `task` and returns (PRETRAINING kwargs, targets).

  Args:
    design: the model's design (or its name).
    batch: the pipeline's batch (see the data contract): input_ids, text_mask,
      token_type_ids [B, T]; region_feats [B, R, F]; region_loc [B, R, L];
      region_mask [B, R]; match_label [B]; plus, as the task needs, object_ids,
      object_conf, attr_ids, attr_conf [B, R], class_probs [B, R, C],
      answer_scores [B, A], qa_valid and shows_question [B]. region_feats and
      class_probs may be float16 (widened here).
    rng: masking rng, a function of (seed, step) (`masking.step_rng`).
    task: one of `tasks_for(design, config)` (static).
    config: run config (`config.model.vocab_size`, `config.pretrain`).

  Returns:
    model_kwargs: backbone arguments plus `mlm_positions` [B, P] (P = 1 of
      weight 0 when the task has no MLM) and, with conditional masking,
      `masked_regions` [B, R].
    targets: arrays for `compute_losses`.
  """
  design = design_lib.as_design(design)
  recipe = design.recipe
  components = task_components(design, task, config)
  pre = config.pretrain
  _require(batch, _required_keys(components, has_class_probs='class_probs' in batch),
           f'{design.name} task {task!r} (losses {components})')
  text_rng, region_rng, feature_rng, answer_rng = jax.random.split(rng, 4)
  input_ids, text_mask = batch['input_ids'], batch['text_mask']
  # Features may arrive in their stored float16 (half the host-to-device bytes);
  # widening is exact, and masking, targets and models work in float32.
  region_feats = batch['region_feats'].astype(jnp.float32)
  region_mask = batch['region_mask']
  matched = design.is_matched(batch['match_label'])
  # Evaluation batches mark padded rows (`_mask` 0): every loss gives them weight 0.
  real = batch.get(MASK_KEY, jnp.ones(matched.shape)).astype(jnp.float32)
  example_weight = (matched.astype(jnp.float32) if recipe.positives_only
                    else jnp.ones(matched.shape, jnp.float32)) * real
  kwargs = dict(input_ids=input_ids, text_mask=text_mask, token_type_ids=batch['token_type_ids'],
                region_feats=region_feats, region_loc=batch['region_loc'],
                region_mask=region_mask)
  match_weights = real
  if not pre.match_questions and 'shows_question' in batch:
    match_weights = real * (1.0 - batch['shows_question'].astype(jnp.float32))
  targets = dict(match_label=batch['match_label'].astype(jnp.int32), matched=matched,
                 text_mask=text_mask, region_mask=region_mask, real=real,
                 match_weights=match_weights)

  if 'mlm' in components:
    tokens = masking.mask_tokens(
        text_rng, input_ids, text_mask, mask_token_id=pre.mask_token_id,
        special_token_ids=tuple(pre.special_token_ids), vocab_size=_vocab_size(config),
        max_predictions=mlm_slots(config, input_ids.shape[1]),
        mask_prob=pre.mask_prob, random_token_min=pre.random_token_min,
        at_least_one=recipe.at_least_one)
    kwargs['input_ids'] = tokens.input_ids
    kwargs['mlm_positions'] = tokens.positions
    targets.update(mlm_targets=tokens.targets,
                   mlm_weights=tokens.weights * example_weight[:, None])
  else:
    kwargs['mlm_positions'] = jnp.zeros((input_ids.shape[0], 1), jnp.int32)

  picked = jnp.zeros(region_mask.shape, bool)
  if any(c in REGION_COMPONENTS for c in components):
    picked = masking.pick_regions(region_rng, region_mask, mask_prob=pre.region_mask_prob,
                                  at_least_one=recipe.at_least_one,
                                  skip_first=recipe.skip_first_region)
    kwargs['region_feats'] = recipe.mask_regions(feature_rng, region_feats, region_mask, picked)
    targets.update(region_picked=picked,
                   region_weights=picked.astype(jnp.float32) * example_weight[:, None],
                   raw_region_feats=region_feats)
  if recipe.conditional_masking:
    kwargs['masked_regions'] = picked

  if 'region_kl' in components or 'mrckl' in components:
    targets['class_probs'] = batch['class_probs'].astype(jnp.float32)
  if 'mrc' in components:
    # The argmax over non-background detector classes; `object_ids` + 1 is the
    # same class when the source stores no distribution (see region.py).
    if 'class_probs' in batch:
      targets['mrc_labels'] = region.mrc_labels(batch['class_probs'].astype(jnp.float32))
    else:
      targets['mrc_labels'] = batch['object_ids'].astype(jnp.int32) + 1
  for name, keys in (('obj', ('object_ids', 'object_conf')), ('attr', ('attr_ids', 'attr_conf'))):
    if name in components:
      targets.update({k: batch[k] for k in keys})
  if 'qa' in components:
    labels, weights = qa.sample_answers(answer_rng, batch['answer_scores'],
                                        (batch['qa_valid'] > 0) & matched)
    targets.update(answer_labels=labels, answer_weights=weights * real)
  return kwargs, targets


def mlm_slots(config: ml_collections.ConfigDict, text_len: int) -> int:
  """MLM positions gathered per example: `pretrain.max_predictions`, else the
  masking default for `text_len`."""
  pre = config.pretrain
  return pre.max_predictions or masking.default_max_predictions(text_len, pre.mask_prob)


def compute_losses(design: DesignOrName, outputs: Mapping[str, jax.Array], targets: Mapping[str, Any],
                   task: str, config: ml_collections.ConfigDict
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Losses of `task` from the PRETRAINING outputs and `make_inputs`' targets.

  Returns:
    (total: the weighted sum, float32 scalar; losses: {component: unweighted
    scalar}, plus the recipe's extra losses, e.g. 'wra' with UNITER's ITM).
  """
  design = design_lib.as_design(design)
  components = task_components(design, task, config)
  weights = _loss_weights(design, config)
  pre = config.pretrain
  losses = {}
  for name in components:
    if name == 'mlm':
      losses[name] = mlm.masked_lm_loss(_get(outputs, 'mlm_logits'), targets['mlm_targets'],
                                        targets['mlm_weights'])
    elif name in MATCHING_LOGITS:
      losses[name] = matching.matching_loss(_get(outputs, MATCHING_LOGITS[name]),
                                            targets['match_label'], targets['match_weights'])
    elif name == 'region_kl':
      losses[name] = region.vilbert_region_loss(_get(outputs, 'region_logits'),
                                                targets['class_probs'],
                                                targets['region_weights'])
    elif name in ('obj', 'attr'):
      logits, ids, conf = (('obj_logits', 'object_ids', 'object_conf') if name == 'obj'
                           else ('attr_logits', 'attr_ids', 'attr_conf'))
      if pre.lxmert_label_regions not in ('all', 'masked'):
        raise ValueError("config.pretrain.lxmert_label_regions must be 'all' or 'masked', "
                         f'got {pre.lxmert_label_regions!r}')
      real_regions = targets['region_mask'] * targets['real'][:, None]
      regions = (real_regions if pre.lxmert_label_regions == 'all'
                 else targets['region_picked'])
      losses[name] = region.lxmert_label_loss(_get(outputs, logits), targets[ids],
                                              targets[conf], regions, real_regions)
    elif name == 'feat':
      losses[name] = region.lxmert_feature_loss(
          _get(outputs, 'feat_pred'), targets['raw_region_feats'], targets['region_picked'],
          targets['region_mask'] * targets['real'][:, None])
    elif name == 'qa':
      losses[name] = qa.qa_loss(_get(outputs, 'qa_logits'), targets['answer_labels'],
                                targets['answer_weights'])
    elif name == 'mrfr':
      losses[name] = region.mrfr_loss(_get(outputs, 'mrfr_pred'), targets['raw_region_feats'],
                                      targets['region_weights'])
    elif name == 'mrc':
      losses[name] = region.mrc_loss(_get(outputs, 'mrc_logits'), targets['mrc_labels'],
                                     targets['region_weights'])
    elif name == 'mrckl':
      losses[name] = region.mrc_kl_loss(_get(outputs, 'mrc_logits'), targets['class_probs'],
                                        targets['region_weights'])
  if design.recipe.extra_losses is not None:
    losses.update(design.recipe.extra_losses(outputs, targets, components, weights))
  total = sum(weights[name] * value for name, value in losses.items())
  return jnp.asarray(total, jnp.float32), losses


def task_components(design: DesignOrName, task: str, config: ml_collections.ConfigDict
                    ) -> tuple[str, ...]:
  """The loss components a task computes."""
  design = design_lib.as_design(design)
  tasks = tasks_for(design, config)
  if task not in tasks:
    raise ValueError(f'task {task!r} is not one of {tasks} (config.pretrain.mix '
                     f'{config.pretrain.mix!r}, tasks {tuple(config.pretrain.tasks)})')
  pre = config.pretrain
  if task == FIRST_STAGE:
    return tuple(t for t, r in zip(pre.tasks, pre.first_stage_ratios) if r)
  return tuple(pre.tasks) if task == ALL else (task,)


def _loss_weights(design: design_lib.Design, config: ml_collections.ConfigDict
                  ) -> dict[str, float]:
  names = design.recipe.loss_names
  given = dict(config.pretrain.get('loss_weights') or {})
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise ValueError(f'config.pretrain.loss_weights has {unknown}, not losses of '
                     f'{design.name} ({names})')
  defaults = design.recipe.default_loss_weights
  return {name: float(given.get(name, defaults.get(name, 1.0))) for name in names}


def _vocab_size(config: ml_collections.ConfigDict) -> int:
  if 'vocab_size' not in config.model:
    raise ValueError('config.model.vocab_size is needed for MLM random-word replacement')
  return int(config.model.vocab_size)


def _required_keys(components: Sequence[str], has_class_probs: bool) -> list[str]:
  """Batch fields that `components` read (besides the model inputs)."""
  keys = ['input_ids', 'text_mask', 'token_type_ids', 'region_feats', 'region_loc',
          'region_mask', 'match_label']
  if 'region_kl' in components or 'mrckl' in components:
    keys.append('class_probs')  # the detector distribution is the target
  if 'mrc' in components and not has_class_probs:
    keys.append('object_ids')
  if 'obj' in components:
    keys += ['object_ids', 'object_conf']
  if 'attr' in components:
    keys += ['attr_ids', 'attr_conf']
  if 'qa' in components:
    keys += ['answer_scores', 'qa_valid']
  return keys


def _require(batch: Batch, keys: Sequence[str], why: str) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f'batch lacks {missing}, needed for {why}; batch has {sorted(batch)}')


def _get(outputs: Mapping[str, jax.Array], key: str) -> jax.Array:
  if key not in outputs:
    raise KeyError(f'model outputs lack {key!r}; outputs have {sorted(outputs)}')
  return outputs[key]
