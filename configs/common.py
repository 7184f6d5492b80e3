"""Defaults shared by every design's config: the model's common fields and the run
sections around it (train, pretrain, data, mesh, checkpoint, init).

The design configs (`configs/<design>.py`) build the model section and call
`make_config`, which fills in the design's published optimiser defaults
(MODELS.md; `OPTIMIZER_DEFAULTS`). Override any field on the command line, e.g.
`--config.train.global_batch_size=64 --config.mesh.shape='(-1,2,1)'`.
"""
import ml_collections

# Published pretraining optimisers (MODELS.md; each original's BertAdam/AdamW
# settings). warmup_fraction is of train.num_steps: UNITER's 10k of 200k is 5%.
OPTIMIZER_DEFAULTS = dict(
    uniter=dict(learning_rate=5e-5, warmup_fraction=0.05, num_steps=200_000,
                adam_b1=0.9, adam_b2=0.98, adam_eps=1e-6, weight_decay=0.01,
                grad_clip_norm=5.0),
    lxmert=dict(learning_rate=1e-4, warmup_fraction=0.05, num_steps=100_000,
                adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, weight_decay=0.01,
                grad_clip_norm=1.0),
    vilbert=dict(learning_rate=1e-4, warmup_fraction=0.1, num_steps=100_000,
                 adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, weight_decay=0.01,
                 grad_clip_norm=1.0),
    visualbert=dict(learning_rate=5e-5, warmup_fraction=0.1, num_steps=100_000,
                    adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, weight_decay=0.01,
                    grad_clip_norm=1.0),
)


# Data fields whose default is None ("use the dataset's own"), with the type a
# command-line override (`--config.data.data_dir=...`) must parse to.
OPTIONAL_DATA_FIELDS = dict(data_dir=str, images_dataset=str, captions_dataset=str,
                            vqa_dataset=str, vocab_file=str, lowercase=bool, seed=int)


def model_defaults() -> ml_collections.ConfigDict:
  """Fields every design's model config has."""
  return ml_collections.ConfigDict(dict(
      dtype='float32',            # compute dtype; 'bfloat16' on accelerators
      param_dtype='float32',      # master weights stay fp32
      attention_impl='auto',      # 'xla', 'cudnn' or 'auto' (cuDNN on GPU for bf16/fp16)
      dropout_rate=0.1,
      attention_dropout_rate=0.1,  # >0 in training takes the explicit attention path
      remat=False,                # nn.remat per layer
  ))


def train_config(design: str) -> ml_collections.ConfigDict:
  """The `config.train` section with `design`'s published optimiser."""
  if design not in OPTIMIZER_DEFAULTS:
    raise ValueError(f'configs/common.py: config.model.name must be one of '
                     f'{sorted(OPTIMIZER_DEFAULTS)}, got {design!r}')
  config = ml_collections.ConfigDict(dict(
      global_batch_size=256,
      grad_accum_steps=1,        # microbatches per step; the update equals the full batch's
      end_learning_rate=0.0,     # linear decay from the peak after warmup to this
      max_steps_this_run=-1,     # stop (with a checkpoint) after this many steps; -1: no limit
      log_every_steps=50,
  ))
  config.update(OPTIMIZER_DEFAULTS[design])
  return config


def make_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full run config around a design's model config."""
  # Imported here so that importing a config module stays light.
  from vlpjax import checkpointing, sharding  # pylint: disable=g-import-not-at-top
  from vlpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vlpjax.objectives import pretraining  # pylint: disable=g-import-not-at-top
  pretrain = pretraining.default_pretrain_config(model.name)
  data = pipeline.default_data_config()
  data.qa = 'qa' in pretrain.tasks   # LXMERT's image-QA objective reads the vqa table
  for name, kind in OPTIONAL_DATA_FIELDS.items():
    if data.get(name) is None:   # a typed None, so the command line can set it
      data[name] = ml_collections.config_dict.placeholder(kind)
  return ml_collections.ConfigDict(dict(
      model=model,
      seed=0,                          # params init, masking, dropout and data order
      train=train_config(model.name),
      # Objectives; the token ids are set from the data's vocabulary at run time.
      pretrain=pretrain,
      data=data,
      mesh=sharding.mesh_config(),
      checkpoint=checkpointing.checkpoint_config(),
      # 'orbax:DIR' (params saved by vlpjax.convert) or 'bert:DIR' (a transformers
      # BertModel directory, into the text side); '' for random init. Used only
      # when the workdir has no checkpoint to resume from.
      init={'from': ''},
  ))
