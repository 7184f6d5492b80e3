r"""Region features for your own images: image files -> an images table.

  python -m vlpjax.extract --images='photos/*.jpg' --name=mine --data_dir=$DATA \
      --weights=/tmp/butd_detector [--boxes=10-100|36] [--batch_size=8] [--on_error=skip]

--images is a folder (its image files) or a glob. Each image is read with
Pillow and run through the detector (`vlpjax.detector.extractor`; --weights:
the params `vlpjax.convert --from=butd-detectron2|hf-frcnn` wrote, with their
config). With --batch_size=1 (the default) each image runs alone at its own
size, as the original extraction; with more, images of one padded size
(`extractor.bucket_size`, read from the file headers first) run together,
split over the local devices, and the padding changes their regions a little
(see `vlpjax.detector.extractor`). Its regions go to `<image id>.npz` (the id is the file name without its
extension) under `<data_dir>/extracted/<name>/`, in the per-image layout that
`features_builder region_npy` reads, which then builds the images table
`region_npy/<name>`: set `--config.data.images_dataset=region_npy/<name>` (and
`data_dir`) in any config. Stopped and rerun, it skips the images whose `.npz`
is written. An image that cannot be read stops the run naming it, or with
--on_error=skip is left out, named in `extract_report.json` beside the `.npz`
files and counted. Progress is logged with an ETA.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import json
import logging
import os
import time
from typing import Any, Iterator, Sequence

from absl import app, flags
import numpy as np

from vlpjax import config_lib, paths
from vlpjax.data import features_builder, formats
from vlpjax.detector import extractor as extractor_lib
from vlpjax.detector import model as detector_model
from vlpjax.detector import weights as detector_weights

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
REPORT_FILE = 'extract_report.json'
# Batched extraction reads every image header first: this many at a time, and a
# progress line every HEADER_LOG_EVERY headers.
HEADER_THREADS = 16
HEADER_LOG_EVERY = 1000


def image_files(images: str) -> list[str]:
  """The image files of a folder, or those a glob matches, sorted.

  Raises:
    FileNotFoundError: nothing found. ValueError: two files share an image id.
  """
  path = paths.path(images)
  if path.is_dir():
    found = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
  else:
    found = list(paths.path(os.path.dirname(images) or '.').glob(os.path.basename(images)))
  found = sorted(os.fspath(p) for p in found)
  if not found:
    raise FileNotFoundError(f'--images={images}: no image files ({", ".join(IMAGE_EXTENSIONS)})')
  ids: dict[str, str] = {}
  for file in found:
    other = ids.setdefault(image_id(file), file)
    if other != file:
      raise ValueError(f'{other} and {file} have the same image id {image_id(file)!r}')
  return found


def image_id(file: str) -> str:
  """The file name without its extension."""
  return os.path.splitext(os.path.basename(file))[0]


def read_image(file: str) -> np.ndarray:
  """RGB pixels [H, W, 3] uint8 of an image file.

  Raises:
    formats.FormatError naming the file when Pillow cannot decode it.
  """
  with _opened(file) as image:
    return np.asarray(image.convert('RGB'))


def image_shape(file: str) -> tuple[int, int]:
  """(height, width) of an image file, from its header (nothing decoded).

  Raises:
    formats.FormatError naming the file when Pillow cannot identify it.
  """
  with _opened(file) as image:
    return image.height, image.width


@contextlib.contextmanager
def _opened(file: str) -> Iterator[Any]:
  """The PIL image of `file`; its errors, and those of decoding it inside the
  `with`, as one `FormatError` naming the file."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    with paths.path(file).open('rb') as stream, Image.open(stream) as image:
      yield image
  except (UnidentifiedImageError, OSError, ValueError) as error:
    raise _unreadable(file, error) from error


def _unreadable(file: str, error: Exception) -> formats.FormatError:
  return formats.FormatError(file, f'not a readable image ({error})', kind='unreadable image')


def region_arrays(regions: dict[str, Any]) -> dict[str, np.ndarray]:
  """A `RegionExtractor` result -> the `.npz` fields of `formats.NpyFolderReader`
  (class distribution with the background first, as the data contract stores it)."""
  width, height = regions['image_size']
  class_probs = regions['class_probs']  # the detector's background is its last column
  return dict(features=regions['features'].astype(np.float32),
              boxes=regions['boxes'].astype(np.float32), image_w=np.int64(width),
              image_h=np.int64(height), objects_id=regions['classes'].astype(np.int64),
              objects_conf=regions['scores'].astype(np.float32),
              attrs_id=regions['attributes'].astype(np.int64),
              attrs_conf=regions['attribute_scores'].astype(np.float32),
              cls_prob=np.concatenate([class_probs[:, -1:], class_probs[:, :-1]], axis=1
                                      ).astype(np.float32))


def _bucket_of(config: detector_model.DetectorConfig, file: str) -> tuple[int, int] | None:
  """The bucket of `file`'s image (from its header), None if unreadable."""
  try:
    return extractor_lib.bucket_size(config, *image_shape(file))
  except formats.FormatError:
    return None


def batches(files: Sequence[str], config: detector_model.DetectorConfig, batch_size: int
            ) -> Iterator[tuple[list[str], tuple[int, int] | None]]:
  """(files, padded size) of each batch: with `batch_size` 1 every file alone
  at its own size (None), in order; else files of one bucket together, by
  bucket. A file whose header cannot be read goes alone, last (its read fails).

  Grouping reads every header first, HEADER_THREADS at a time (on gs:// each
  read is a request), logging progress with an ETA.
  """
  if batch_size == 1:
    yield from (([file], None) for file in files)
    return
  by_bucket: dict[tuple[int, int], list[str]] = {}
  unreadable = []
  began = time.time()
  with concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
    buckets = pool.map(functools.partial(_bucket_of, config), files)
    for count, (file, bucket) in enumerate(zip(files, buckets), 1):
      if bucket is None:
        unreadable.append(file)
      else:
        by_bucket.setdefault(bucket, []).append(file)
      if count % HEADER_LOG_EVERY == 0 or count == len(files):
        elapsed = time.time() - began
        logging.info('read %d of %d image headers (%.0f s), ETA %.0f s', count, len(files),
                     elapsed, elapsed / count * (len(files) - count))
  for bucket, members in sorted(by_bucket.items()):
    for start in range(0, len(members), batch_size):
      yield members[start:start + batch_size], bucket
  yield from (([file], None) for file in unreadable)


def extract_images(files: Sequence[str], out_dir: str, extractor: extractor_lib.RegionExtractor,
                   batch_size: int = 1, on_error: str = 'raise') -> dict[str, Any]:
  """Writes `<out_dir>/<image id>.npz` for each of `files` not yet written, in
  batches of `batch_size` (see `batches`); returns (and writes as REPORT_FILE)
  the counts and the skipped images."""
  report = formats.ErrorReport(on_error, out_dir)
  out = paths.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  todo = [f for f in files if not (out / f'{image_id(f)}.npz').exists()]
  logging.info('%d images, %d already extracted, %d to go', len(files), len(files) - len(todo),
               len(todo))
  began, done, written = time.time(), 0, 0
  for batch, padded_size in batches(todo, extractor.config, batch_size):
    readable, pixels = [], []
    for file in batch:
      try:
        pixels.append(read_image(file))
        readable.append(file)
      except formats.FormatError as error:
        report.handle(error)
    done += len(batch)
    if not readable:
      continue
    regions = (extractor.batch(pixels, padded_size) if padded_size else
               [extractor(image) for image in pixels])
    for file, image_regions in zip(readable, regions):
      buffer = io.BytesIO()
      np.savez(buffer, **region_arrays(image_regions))
      # Written whole, then renamed: an interrupted write leaves no .npz to skip.
      partial = out / f'{image_id(file)}.npz.partial'
      partial.write_bytes(buffer.getvalue())
      partial.rename(out / f'{image_id(file)}.npz')
      written += 1
    elapsed = time.time() - began
    logging.info('extracted %d of %d (%.0f s), ETA %.0f s', done, len(todo), elapsed,
                 elapsed / done * (len(todo) - done))
  summary = dict(images=len(files), extracted=written, already_extracted=len(files) - len(todo),
                 skipped=len(report.skipped), skipped_images=report.skipped)
  (out / REPORT_FILE).write_text(json.dumps(summary, indent=1))
  return summary


def build_table(name: str, out_dir: str, data_dir: str,
                config: detector_model.DetectorConfig, on_error: str = 'raise') -> str:
  """Builds `region_npy/<name>` from the `.npz` files; returns the table's name."""
  table = features_builder.ImagesConfig(name=name, sources=(os.fspath(paths.path(out_dir)),),
                                        feature_dim=config.res5_channels,
                                        num_classes=config.num_classes + 1, on_error=on_error)
  builder = features_builder.RegionNpy(config=table, data_dir=data_dir)
  builder.download_and_prepare(download_config=features_builder.download_config(None, True))
  return f'region_npy/{name}'


def parse_boxes(boxes: str) -> tuple[int, int]:
  """'10-100' -> (10, 100); '36' -> (36, 36)."""
  low, _, high = boxes.partition('-')
  try:
    bounds = int(low), int(high or low)
  except ValueError:
    raise ValueError(f'--boxes must be N or MIN-MAX, got {boxes!r}') from None
  if not 0 < bounds[0] <= bounds[1]:
    raise ValueError(f'--boxes needs 0 < MIN <= MAX, got {boxes!r}')
  return bounds


def main() -> None:
  """The command line (flags defined here, not at import)."""
  images = flags.DEFINE_string('images', None, 'A folder of images, or a glob.')
  name = flags.DEFINE_string('name', None, 'The table: region_npy/<name>.')
  data_dir = flags.DEFINE_string('data_dir', None, 'TFDS data_dir of the table.')
  weights = flags.DEFINE_string('weights', None, 'Detector params (vlpjax.convert output).')
  boxes = flags.DEFINE_string('boxes', None, 'Regions per image: MIN-MAX, or N (default: '
                              "the weights' config; the published one's is 10-100).")
  batch_size = flags.DEFINE_integer('batch_size', 1, 'Images run together (1: each alone at '
                                    'its own size, as the original extraction).')
  on_error = flags.DEFINE_enum('on_error', 'raise', list(formats.ON_ERROR_CHOICES),
                               'An unreadable image: stop, or skip it and count it.')
  flags.mark_flags_as_required(['images', 'name', 'data_dir', 'weights'])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if batch_size.value < 1:
      raise app.UsageError(f'--batch_size must be at least 1, got {batch_size.value}')
    config_lib.clean_logging()
    config = detector_weights.read_config(weights.value)
    if boxes.value is not None:
      min_boxes, max_boxes = parse_boxes(boxes.value)
      config = config.replace(min_boxes=min_boxes, max_boxes=max_boxes)
    files = image_files(images.value)
    out_dir = paths.join(data_dir.value, 'extracted', name.value)
    extractor = extractor_lib.RegionExtractor.from_orbax(weights.value, config)
    summary = extract_images(files, out_dir, extractor, batch_size.value, on_error.value)
    logging.info('%s', {k: v for k, v in summary.items() if k != 'skipped_images'})
    table = build_table(name.value, out_dir, data_dir.value, config, on_error.value)
    logging.info('wrote the images table %s under %s', table, data_dir.value)

  app.run(run)


if __name__ == '__main__':
  main()
