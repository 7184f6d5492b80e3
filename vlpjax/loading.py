"""A trained model from its workdir alone, ready to predict.

  import vlpjax
  model = vlpjax.load('/tmp/vlpjax/lxmert_vqa')       # the newest checkpoint
  model.answer(['what colour is the circle?'], features, boxes, image_size=(640, 480))

The workdir holds what inference needs (`vlpjax.train.write_run_files`): the
run's `config.json`, the tokenizer's `vocab.txt` and the task's files (VQA:
`answers.txt`); no data table is opened. The task's `predictor` gives the
returned object its methods (VQA: `answer`).
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from vlpjax import paths, train
from vlpjax.tasks import get_task


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` trained with (`config.json`)."""
  path = paths.path(workdir) / train.RUN_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: is {workdir} a vlpjax workdir?')
  return ml_collections.ConfigDict(json.loads(path.read_text(encoding='utf-8')))


def load(workdir: str, step: int | None = None) -> Any:
  """The task's predictor of the run in `workdir`, with the params of checkpoint
  `step` (None: the newest), on the first device.

  Raises:
    FileNotFoundError: `workdir` has no config.json or no such checkpoint.
  """
  config = read_run_config(workdir)
  return get_task(config.task).predictor(config, workdir, step)
