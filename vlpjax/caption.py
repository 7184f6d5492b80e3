r"""Caption a table of images with a trained captioning run.

  python -m vlpjax.caption --workdir=/tmp/vlpjax/uniter_caption \
      --images=lxmert_tsv/coco --data_dir=~/tensorflow_datasets \
      [--split=train] [--num_images=100] [--beam_size=5] [--output=captions.json]

The run comes from its workdir alone (config.json, vocab.txt, the newest
checkpoint or --checkpoint_step). The images are split --split of the TFDS
images table --images (`vlpjax.data.features_builder`'s contract: features,
boxes, image_w, image_h, image_id): your own images once their region
features are a table (`python -m vlpjax.data.features_builder`). Captions are
decoded in batches of --batch_size (the predictor pads the last one, so one
program compiles), with the run's beam size and length penalty unless the flags say
otherwise, and written as COCO's results file `[{"image_id", "caption"}]`
(ids of digits only as numbers, as COCO's evaluation expects) to --output
(default `<workdir>/captions/<table>_<split>.json`). Progress is logged with
an ETA.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from absl import app, flags
import numpy as np
import tensorflow_datasets as tfds

from vlpjax import config_lib, loading, paths
from vlpjax.evaluators import caption_metrics
from vlpjax.tasks import caption as caption_task


def results_image_id(image_id: Any) -> Any:
  """A table's image id as the results file holds it: digits as an int."""
  text = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
  return int(text) if text.isdigit() else text


def image_rows(table: str, data_dir: str | None, split: str, num_images: int
               ) -> tuple[Any, int]:
  """(the images table's split as a TFDS data source, how many rows to caption)."""
  try:
    source = tfds.data_source(table, data_dir=data_dir)
  except Exception as error:  # TFDS raises several kinds for a missing table
    raise FileNotFoundError(f'--images={table}: no such TFDS table under '
                            f'{data_dir or "~/tensorflow_datasets"} ({error})') from error
  if split not in source:
    raise ValueError(f'--images={table} has splits {sorted(source)}, not --split={split!r}')
  rows = source[split]
  return rows, min(len(rows), num_images) if num_images else len(rows)


def caption_table(workdir: str, table: str, *, data_dir: str | None = None,
                  split: str = 'train', num_images: int = 0, batch_size: int = 32,
                  beam_size: int | None = None, length_penalty: float | None = None,
                  checkpoint_step: int | None = None, output: str | None = None) -> str:
  """Captions the images of `table`'s `split` (module docstring); returns the
  results file's path."""
  config = loading.read_run_config(workdir)
  if config.task != 'caption':
    raise ValueError(f'{workdir} is a {config.task!r} run, not a captioning one '
                     f'(config.task={config.task!r})')
  if beam_size is not None:
    config.caption.beam_size = beam_size
  if length_penalty is not None:
    config.caption.length_penalty = length_penalty
  predictor = caption_task.predictor(config, workdir, checkpoint_step)
  rows, total = image_rows(table, data_dir, split, num_images)
  results, began = [], time.time()
  for start in range(0, total, batch_size):
    records = [rows[i] for i in range(start, min(start + batch_size, total))]
    texts = predictor.caption([(r['features'], r['boxes'], (r['image_w'], r['image_h']))
                               for r in records], batch_size)
    results += [dict(image_id=results_image_id(r['image_id']), caption=t)
                for r, t in zip(records, texts)]
    elapsed = time.time() - began
    logging.info('captioned %d of %d images (%.0f s), ETA %.0f s', len(results), total,
                 elapsed, elapsed / len(results) * (total - len(results)))
  output = output or paths.join(workdir, 'captions', f'{table.replace("/", "_")}_{split}.json')
  caption_metrics.write_results(output, {r['image_id']: r['caption'] for r in results})
  logging.info('wrote %d captions to %s', len(results), output)
  return output


def main() -> None:
  """The command line (flags defined here, not at import)."""
  workdir = flags.DEFINE_string('workdir', None, 'A captioning run\'s workdir.')
  images = flags.DEFINE_string('images', None, 'TFDS images table, e.g. lxmert_tsv/coco.')
  data_dir = flags.DEFINE_string('data_dir', None, 'TFDS data_dir of the images table.')
  split = flags.DEFINE_string('split', 'train', 'Split of the images table.')
  num_images = flags.DEFINE_integer('num_images', 0, 'Caption the first N images; 0: all.')
  batch_size = flags.DEFINE_integer('batch_size', 32, 'Images per decoding batch.')
  beam_size = flags.DEFINE_integer('beam_size', None, 'Beam size; default: the run\'s.')
  length_penalty = flags.DEFINE_float('length_penalty', None,
                                      'Beam length penalty alpha; default: the run\'s.')
  step = flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint; default: newest.')
  output = flags.DEFINE_string('output', None, 'Results file; default under the workdir.')
  flags.mark_flags_as_required(['workdir', 'images'])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config_lib.clean_logging()
    caption_table(workdir.value, images.value, data_dir=data_dir.value, split=split.value,
                  num_images=num_images.value, batch_size=batch_size.value,
                  beam_size=beam_size.value, length_penalty=length_penalty.value,
                  checkpoint_step=step.value, output=output.value)

  app.run(run)


if __name__ == '__main__':
  main()
