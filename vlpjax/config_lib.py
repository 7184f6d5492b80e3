"""The run config: defaults shared by every design's config, checks of its fields,
and the command line's reading of it.

The design configs (`configs/<design>.py`) build the model section and call
`make_config`, which adds the run sections around it (train, pretrain, data,
mesh, checkpoint, init) and fills in the design's published optimiser and text
length (MODELS.md; `Design.optimizer`, `Design.max_text_len`). Override any field on the command line, e.g.
`--config.train.global_batch_size=64 --config.mesh.shape='(-1,2,1)'`.

This module lives in the package, not beside the config files, so that a config
file imports only installed modules and loads from any working directory
(`--config=/abs/path/configs/uniter.py:base`).
"""
from __future__ import annotations

import difflib
import logging
import re
import sys
from typing import Callable, Iterator

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections

# Data fields whose default is None ("use the dataset's own", or "decide from the
# data"), with the type a command-line override (`--config.data.data_dir=...`)
# must parse to.
OPTIONAL_DATA_FIELDS = dict(data_dir=str, images_dataset=str, captions_dataset=str,
                            vqa_dataset=str, gqa_dataset=str, vocab_file=str, lowercase=bool,
                            seed=int, cache_images=bool, images_store_dir=str)


# Compute and parameter dtypes the models take (`model.dtype`, `model.param_dtype`).
DTYPES = ('float32', 'bfloat16', 'float16')


def model_defaults() -> ml_collections.ConfigDict:
  """Fields every design's model config has."""
  return ml_collections.ConfigDict(dict(
      dtype='float32',            # compute dtype (DTYPES); 'bfloat16' on accelerators
      param_dtype='float32',      # master weights stay fp32
      attention_impl='auto',      # 'xla', 'cudnn' or 'auto' (cuDNN on GPU for bf16/fp16)
      dropout_rate=0.1,
      attention_dropout_rate=0.1,  # >0 in training takes the explicit attention path
      remat=False,                # nn.remat per layer
      # Each stack of repeated layers as one nn.scan: compiled once, params
      # stacked on a leading 'layers' axis (layers.layers_like converts).
      scan_layers=False,
      # The MLM / LM head's logits over the vocabulary in float32 whatever the
      # compute dtype (its matmul accumulates and returns float32), as MaxText's
      # logits_dot_in_fp32: bf16 logits of a 30k vocabulary round to ~0.03.
      float32_logits=False,
  ))


def train_config(design: str) -> ml_collections.ConfigDict:
  """The `config.train` section with `design`'s published optimiser."""
  from vlpjax.models import design as design_lib  # pylint: disable=g-import-not-at-top
  optimizer = design_lib.get_design(design).optimizer
  config = ml_collections.ConfigDict(dict(
      global_batch_size=256,
      grad_accum_steps=1,        # microbatches per step; the update equals the full batch's
      end_learning_rate=0.0,     # linear decay from the peak after warmup to this
      head_lr_multiplier=1.0,    # the task heads' learning rate / the backbone's
      max_steps_this_run=-1,     # stop (with a checkpoint) after this many steps; -1: no limit
      log_every_steps=50,
      # Keep the gradients' memory between steps (vlpjax.train.keeps_grad_buffers);
      # None: on the CPU only, where fresh memory costs page faults every step.
      keep_grad_buffers=ml_collections.config_dict.placeholder(bool),
  ))
  config.update(optimizer)
  return config


# Label spaces of the embedded world (default size, `vlpjax/data/world.py`): the
# 'small' models, which pretrain on it, size their inputs and heads to these.
EMBEDDED_WORLD = dict(
    vocab_size=148,          # its WordPiece vocabulary
    feature_dim=2048,        # region features, as the BUTD detector's
    num_region_classes=9,    # detector classes incl. background (class_probs)
    num_object_labels=8,     # object labels less background (LXMERT)
    num_attr_labels=10,      # attribute labels (LXMERT)
    num_answers=34,          # VQA answers (LXMERT's QA head)
)
# Shapes shared by the 'small' models: a CPU-sized BERT.
SMALL_SHAPES = dict(hidden_size=256, num_heads=4, intermediate_size=1024,
                    max_position_embeddings=64, type_vocab_size=2)
# The main job: a short run on the embedded world that shows the losses fall,
# the same for every design (equal data and compute). The published learning
# rates, tuned for 100k+ steps, leave image-text matching at chance within it;
# 3e-4 and 2,000 steps take every design's out (benchmarks/RESULTS.md).
SMALL_RUN = dict(global_batch_size=32, num_steps=2000, learning_rate=3e-4,
                 warmup_fraction=0.05, log_every_steps=25)


# Config sizes that run on the embedded world.
WORLD_SIZES = ('small', 'tiny')


def small_model(name: str, world_fields: tuple[str, ...], **fields
                ) -> ml_collections.ConfigDict:
  """A 'small' model config: SMALL_SHAPES, the `world_fields` of EMBEDDED_WORLD
  the design has, and its own `fields` (layer counts, second-stream widths)."""
  config = model_defaults()
  config.name = name
  config.update(SMALL_SHAPES)
  config.update({k: EMBEDDED_WORLD[k] for k in world_fields})
  config.update(fields)
  return config


def fit_model_to_tables(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its model's label spaces (vocabulary, region classes,
  attributes, answers: the fields the design has) set from its data tables
  (`tables.dataset_info`): what a 'tiny' model needs on the tiny world."""
  from vlpjax.data import tables  # pylint: disable=g-import-not-at-top
  info = tables.dataset_info(config.data)
  labels = dict(vocab_size=info['vocab_size'], num_region_classes=info['num_object_classes'],
                num_object_labels=info['num_object_classes'] - 1,
                num_attr_labels=info['num_attributes'], num_answers=info['num_answers'])
  config.model.update({k: v for k, v in labels.items() if k in config.model})
  return config


def config_arg(arg: str) -> tuple[str, dict[str, str]]:
  """A config file's argument 'SIZE[,task=TASK]' -> (SIZE, {'task': TASK})."""
  size, *options = arg.split(',')
  parsed = {}
  for option in options:
    key, sep, value = option.partition('=')
    if not sep or key != 'task':
      raise ValueError(f'config argument {arg!r}: expected SIZE[,task=TASK], got {option!r}')
    parsed[key] = value
  return size, parsed


def make_config(model: ml_collections.ConfigDict, size: str = '', task: str = 'pretrain'
                ) -> ml_collections.ConfigDict:
  """The full run config around a design's model config (of `size`: 'small'
  runs get SMALL_RUN's training schedule and a checkpoint every 250 steps) for
  `task` (`vlpjax.tasks`; a downstream task adds its sections, recipe and
  evaluators with its `configure`)."""
  # Imported here so that importing a config module stays light.
  from vlpjax import checkpointing, sharding  # pylint: disable=g-import-not-at-top
  from vlpjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from vlpjax.models import design as design_lib  # pylint: disable=g-import-not-at-top
  from vlpjax.objectives import pretraining  # pylint: disable=g-import-not-at-top
  design = design_lib.get_design(model.name)
  pretrain = pretraining.default_pretrain_config(design)
  data = input_pipeline.default_data_config()
  # The original's text length; the embedded world's sentences are shorter.
  data.max_text_len = (design.world_text_len if size in WORLD_SIZES
                       else design.max_text_len)
  data.qa = 'qa' in pretrain.tasks   # LXMERT's image-QA objective reads the vqa table
  for name, kind in OPTIONAL_DATA_FIELDS.items():
    if data.get(name) is None:   # a typed None, so the command line can set it
      data[name] = ml_collections.config_dict.placeholder(kind)
  config = ml_collections.ConfigDict(dict(
      model=model,
      task='pretrain',                 # vlpjax.tasks: what is trained and evaluated
      # Evaluators: {name: dict(type=..., split=..., batch_size=..., log_steps=...)}.
      evals={},
      seed=0,                          # params init, masking, dropout and data order
      # JAX's persistent compilation cache (local or gs://), so that a resumed run
      # skips compiling; '' keeps $JAX_COMPILATION_CACHE_DIR (read by JAX itself).
      compilation_cache_dir='',
      train=train_config(model.name),
      # Objectives; the token ids are set from the data's vocabulary at run time.
      pretrain=pretrain,
      data=data,
      mesh=sharding.mesh_config(),
      checkpoint=checkpointing.checkpoint_config(),
      # 'workdir:DIR' (the backbone of a vlpjax run's newest checkpoint, e.g. a
      # pretraining run to fine-tune), 'orbax:DIR' (params saved by vlpjax.convert)
      # or 'bert:DIR' (a transformers BertModel directory, into the text side);
      # '' for random init. DIR is local
      # (relative to the working directory) or gs://. Used only when the workdir
      # has no checkpoint to resume from.
      init=dict(source=''),
  ))
  if size == 'small':
    config.train.update(SMALL_RUN)
    config.pretrain.update(design.world_pretrain)
    config.checkpoint.every_steps = 250
    # The world's vocabulary has no [unused] block to skip (UNITER's 106 does so
    # in bert-base-cased): random words come from all of it.
    config.pretrain.random_token_min = 0
    # Validation losses at the first and the last step.
    config.evals = ml_collections.ConfigDict(dict(val=dict(
        type='loss', split='validation', batch_size=128, log_steps=config.train.num_steps)))
  if task != 'pretrain':
    from vlpjax.tasks import get_task  # pylint: disable=g-import-not-at-top
    get_task(task).configure(config, size)
  # Every evaluator's schedule fields, so that a flag can turn them off.
  for entry in (config.get('evals') or {}).values():
    for field in ('at_first_step', 'at_last_step'):
      entry[field] = entry.get(field, True)
  return config


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that take one of a few values, and that `mesh.shape` parsed.

  Device-free and cheap, so the command line runs it before anything else: a bad
  dtype would otherwise fail deep inside the model.

  Raises:
    ValueError naming the field, its value and the choices.
  """
  # Imported here so that importing a config module stays light.
  from vlpjax import sharding  # pylint: disable=g-import-not-at-top
  from vlpjax.models import layers  # pylint: disable=g-import-not-at-top
  from vlpjax.objectives import pretraining  # pylint: disable=g-import-not-at-top
  choices = {('model', 'dtype'): DTYPES, ('model', 'param_dtype'): DTYPES,
             ('model', 'attention_impl'): layers.ATTENTION_IMPLS,
             ('pretrain', 'mix'): pretraining.MIXES}
  for (section, name), allowed in choices.items():
    value = config[section][name]
    if value not in allowed:
      raise ValueError(f'config.{section}.{name} must be one of {allowed}, got {value!r}')
  sharding.mesh_shape(config.mesh)
  sharding.mesh_shape(config.mesh, 'dcn_shape')


# ----------------------------------------------------------------------------
# The command line (`vlpjax.main`, `vlpjax.convert`).

# Loggers whose INFO lines a command hides unless --verbosity is given: absl's
# carries orbax's (about 30 lines per checkpoint), TFDS's and grain's; 'jax' its
# backend probing.
QUIET_LOGGERS = ('absl', 'jax')


class _CommandFormatter(logging.Formatter):
  """'08:04:00 message', and the level for a warning or worse."""

  def format(self, record: logging.LogRecord) -> str:
    level = '' if record.levelno < logging.WARNING else f'{record.levelname} '
    return f'{self.formatTime(record, "%H:%M:%S")} {level}{record.getMessage()}' + (
        f'\n{self.formatException(record.exc_info)}' if record.exc_info else '')


def clean_logging() -> None:
  """A command's log (call once its flags are parsed): vlpjax's own INFO lines,
  the libraries' warnings, each as '08:04:00 message'. With absl's --verbosity
  on the command line, logging is left as absl set it (every library, absl's
  line prefix)."""
  if flags.FLAGS['verbosity'].present:
    return
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logging.get_absl_handler().setFormatter(_CommandFormatter())


def flags_parser(config_flag: flags.FlagHolder) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing for a command with a config file flag, for
  `app.run(main, flags_parser=...)`: an override of a field the config lacks, or
  a value `check_fields` rejects, ends the program with a one-line error (the
  override's full path and the nearest fields) instead of a traceback."""
  def parse(argv: list[str]) -> list[str]:
    try:
      remaining = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, ValueError):
      # config_flags' errors for a missing field: AttributeError("'nope'"), or a
      # ValueError for a name it cannot parse (a keyword such as `from`).
      problem = _unknown_override(argv, config_flag.name)
      if problem is None:
        raise
      sys.exit(f'FATAL Flags parsing error: {problem}')
    try:
      if config_flag.value is not None:  # commands where the config is optional
        check_fields(config_flag.value)
    except ValueError as error:
      sys.exit(f'FATAL Flags parsing error: {error}')
    return remaining
  return parse


def _unknown_override(argv: list[str], flag_name: str) -> str | None:
  """Describes the first `--<flag_name>.a.b` override in `argv` that names no
  field of the config; None if every override names one."""
  overrides = [m.group(1) for m in (re.match(rf'--?(?:no)?{flag_name}\.([^=]+)', arg)
                                     for arg in argv[1:]) if m]
  config = _load_config_file(argv, flag_name) if overrides else None
  if config is None:
    return None
  for override in overrides:
    names = override.split('.')
    node = config
    for depth, name in enumerate(names):
      if not isinstance(node, ml_collections.ConfigDict) or '[' in name:
        break  # into a value (an index): config_flags' own error stands
      if name not in node:
        section = '.'.join([flag_name, *names[:depth]])
        # Among the fields of the section that exists (a name near one in another
        # section is rarely meant), or among all for a misspelt section.
        nearest = difflib.get_close_matches('.'.join(names[depth:]), list(_leaf_paths(node)),
                                            n=3)
        hint = (f'nearest: {", ".join(f"{section}.{p}" for p in nearest)}' if nearest
                else f'its fields: {", ".join(node)}')
        return f'--{flag_name}.{".".join(names)}: {section} has no field {name!r}; {hint}'
      node = node[name]
  return None


def _load_config_file(argv: list[str], flag_name: str) -> ml_collections.ConfigDict | None:
  """The config of `--<flag_name>=FILE[:ARG]` (or `--<flag_name> FILE`) in `argv`,
  without overrides; None if `argv` does not name one."""
  for arg, following in zip(argv, argv[1:] + [None]):
    match = re.fullmatch(rf'--?{flag_name}(?:=(.*))?', arg)
    if match:
      value = following if match.group(1) is None else match.group(1)
      return None if value is None else flags.FLAGS[flag_name].parser.parse(value)
  return None


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = '') -> Iterator[str]:
  """Dotted paths of every leaf field of `config`."""
  for name in config.keys():
    if isinstance(config[name], ml_collections.ConfigDict):
      yield from _leaf_paths(config[name], f'{prefix}{name}.')
    else:
      yield prefix + name
