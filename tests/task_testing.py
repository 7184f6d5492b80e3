"""What the fine-tuning tasks' tests share: a task's table built from tiny files
in the real formats and read back, short fine-tunes on the tiny world (the
`data_config` fixture of conftest.py) and what they write."""
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

import real_format_fixtures as fx
from test_finetune import read_metrics
from vlpjax import train
from vlpjax.data import annotations_builder as ab
from vlpjax.data import features_builder as fb

# ----------------------------------------------------------------------------
# Tables from files in the real formats.


def build_lxmert_images(root, name: str, sources: Mapping[str, Sequence[str]]) -> None:
  """The images table `lxmert_tsv/<name>` in `root/data` from LXMERT TSVs in
  `root` of random features: file name -> its image ids (the k-th file's
  features drawn with seed k)."""
  for seed, (file_name, image_ids) in enumerate(sources.items()):
    fx.write_lxmert_tsv(root / file_name, fx.random_images(seed, list(image_ids)))
  fb.main(['lxmert_tsv', '--name', name, '--data_dir', str(root / 'data'), '--manual_dir',
           str(root), '--feature_dim', str(fx.FEATURE_DIM), '--sources', *sources])


def build_table(builder: str, images: str, root, config: str, *args: str) -> None:
  """`python -m vlpjax.data.annotations_builder <builder>` on the files in `root`
  against the images table `images` (e.g. 'lxmert_tsv/gqa'), into `root/data`."""
  ab.main([builder, '--config', config, '--images', images, '--data_dir', str(root / 'data'),
           '--manual_dir', str(root), *args])


def read_split(root, name: str, split: str) -> list[dict[str, Any]]:
  """Every row of split `split` of table `name` (e.g. 'gqa/tiny') in `root/data`."""
  source = tfds.data_source(name, data_dir=str(root / 'data'))[split]
  return [source[i] for i in range(len(source))]


def build_report(root, name: str) -> dict[str, Any]:
  """The builder's report of table `name` (e.g. 'gqa/errors') in `root/data`."""
  return json.loads((root / 'data' / name / '1.0.0' / fb.REPORT_FILE).read_text())


# ----------------------------------------------------------------------------
# Fine-tuning on the tiny world.


def finetune(config, workdir: str, num_steps: int, eval_batch: int
             ) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
  """Trains `config` (a `test_finetune.tiny_config`) for `num_steps`, with one
  checkpoint at the end and its evaluators in batches of `eval_batch`, those on
  validation every 2 steps: (the config, the last metrics, the metrics.jsonl
  records)."""
  config.train.num_steps = num_steps
  config.checkpoint.every_steps = num_steps
  for evaluator in config.evals.values():
    evaluator.batch_size = eval_batch
    if evaluator.split == 'validation':
      evaluator.log_steps = 2
  final = train.train_and_evaluate(config, workdir)
  return config, final, read_metrics(workdir)


def predictions_of(workdir: str, name: str, step: int) -> Any:
  """The JSON prediction file of evaluator `name` at `step`."""
  with open(os.path.join(workdir, 'predictions', f'{name}_step{step}.json'),
            encoding='utf-8') as f:
    return json.load(f)


def assert_parts_merged(workdir: str) -> None:
  """No prediction part is left: process 0 merged them all."""
  assert not [f for f in os.listdir(os.path.join(workdir, 'predictions')) if '.part-' in f]


def rows_of_first_image(data_dir: str, table: str, split: str = 'validation'
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(the rows of `split` of the world's `table` (e.g. 'tiny_gqa') about the image
  of its first row, that image's row of the images table)."""
  source = tfds.data_source(f'vlp_world/{table}', data_dir=data_dir)[split]
  rows = [r for r in (source[i] for i in range(len(source)))
          if r['image_index'] == source[0]['image_index']]
  image = tfds.data_source('vlp_world/tiny_images', data_dir=data_dir)['train'][
      rows[0]['image_index']]
  return rows, image


def image_inputs(image: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, tuple[Any, Any]]:
  """A predictor's image from a row of the images table: (features, boxes, (width, height))."""
  return image['features'], image['boxes'], (image['image_w'], image['image_h'])
