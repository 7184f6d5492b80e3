"""TFDS builder of the embedded vision-language world (`vlp_world`).

Layout: one builder, `VlpWorld`, with a builder config per (size, table), named
`<size>_<table>`: `tiny_images`, `tiny_captions`, `tiny_vqa`, `tiny_gqa`,
`tiny_refexp`, `tiny_nlvr2`, `tiny_snli_ve`, `tiny_gt_images`, `tiny_vcr`,
`default_images`, ... A TFDS builder has one
feature spec per config, and the tables have different features, hence one
config per table. All configs of a size share one `WorldConfig`, so their tables describe
the same images; since every image is a pure function of (seed, index), any
table can be built alone, and building several in one process generates the
world (and trains the vocabulary) once (`world.make_world` is cached).

Tables follow the project's data contract: the images table has one split,
`train`, holding every image in index order (record i has index == i); text
tables have splits train/validation/test by image and point at images by
`image_index`. Files stored with each table's data:

  vocab.txt       every table: the WordPiece vocabulary (`vocab.py`)
  answers.txt     vqa, gqa: the answer vocabulary, one per line (`answer_labels` index it)
  objects.txt     images: detector classes (`class_probs` columns; `object_ids`
                  index them less background: id k is column k + 1)
  attributes.txt  images: attribute labels (`attr_ids`)

Metadata: the label counts (num_object_classes incl. background, num_attributes,
num_answers) and the fingerprint of the images' ordered ids
(`features_builder.image_ids_fingerprint`): the images table's own, and, in each
text table, that of the images it refers to, which the pipeline checks.

Generation is written shard by shard in order (`SideFilesBuilder`, no TFDS
shuffler, no TensorFlow). Region features and class distributions are stored
as raw bytes (`encoding='bytes'`): TFDS's default float16 encoding goes through
a list of Python floats and is ~10x slower to write.

  tfds.data_source('vlp_world/tiny_images', data_dir=DIR)['train'][0]
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from vlpjax import paths
from vlpjax.data import vocab as vocab_lib
from vlpjax.data import world as world_lib
from vlpjax.data import features_builder

TABLES = ('images', 'captions', 'vqa', 'gqa', 'refexp', 'nlvr2', 'snli_ve', 'gt_images', 'vcr')
# Tables of images (the images table's features), by the World method that makes their rows:
# `gt_images` has one region per object, its true box (referring expressions'
# "ground-truth regions").
IMAGE_TABLES = {'images': 'image_examples', 'gt_images': 'gt_image_examples'}
IMAGES_SPLIT = 'train'
VOCAB_FILE = 'vocab.txt'
ANSWERS_FILE = 'answers.txt'
OBJECTS_FILE = 'objects.txt'
ATTRIBUTES_FILE = 'attributes.txt'

WORLD_SIZES = {
    # Builds in seconds, for tests; feature_dim matches the tiny model configs.
    'tiny': world_lib.WorldConfig(
        num_images=32, num_regions=10, min_regions=6, feature_dim=40,
        image_height=(48, 64), image_width=(56, 80), num_objects=(2, 4),
        captions_per_image=3, questions_per_image=4, refexps_per_image=2,
        split_fractions=(0.75, 0.125, 0.125)),
    # BUTD-like: 36 regions of 2048-d float16 features.
    'default': world_lib.WorldConfig(num_images=3000, num_regions=36, min_regions=36,
                                     feature_dim=2048),
}


@dataclasses.dataclass(eq=False, kw_only=True)
class VlpWorldConfig(tfds.core.BuilderConfig):
  """One table of one world size.

  Attributes:
    world: the world's sizes and seeds (shared by all tables of a size).
    table: one of TABLES.
    images_per_shard: images per ArrayRecord shard of the images table (a
      shard's examples are held in memory while it is written).
  """
  world: world_lib.WorldConfig = WORLD_SIZES['tiny']
  table: str = 'images'
  images_per_shard: int = 1000

  def __post_init__(self):
    if self.table not in TABLES:
      raise ValueError(f'VlpWorldConfig {self.name!r}: table must be one of {TABLES}, '
                       f'got {self.table!r}')


def _config(size: str, table: str) -> VlpWorldConfig:
  return VlpWorldConfig(name=f'{size}_{table}', world=WORLD_SIZES[size], table=table,
                        description=f'{table} table of the {size} world')


def table_features(table: str, feature_dim: int) -> tfds.features.FeaturesDict:
  """Features of `table` per the data contract ([N] = regions of the image)."""
  image_ref = dict(image_index=np.int64, image_id=tfds.features.Text())
  text = tfds.features.Text()
  features = {
      'images': lambda: features_builder.images_features(feature_dim,
                                                         len(world_lib.OBJECT_CLASSES)),
      'gt_images': lambda: features_builder.images_features(feature_dim,
                                                            len(world_lib.OBJECT_CLASSES)),
      'captions': lambda: dict(caption_id=np.int64, text=text, **image_ref),
      'vqa': lambda: dict(
          question_id=np.int64, question=text, **image_ref,
          answers=tfds.features.Sequence(tfds.features.Text()),
          answer_labels=tfds.features.Sequence(np.int32),
          answer_scores=tfds.features.Sequence(np.float32),
          question_type=tfds.features.Text()),
      # The vqa table's questions with one true answer, as `annotations_builder.Gqa`'s.
      'gqa': lambda: dict(
          question_id=text, question=text, **image_ref, answer=text,
          answer_labels=tfds.features.Sequence(np.int32),
          answer_scores=tfds.features.Sequence(np.float32)),
      'refexp': lambda: dict(ref_id=np.int64, text=text, **image_ref,
                             target_box=tfds.features.Tensor(shape=(4,), dtype=np.float32)),
      'nlvr2': lambda: dict(
          pair_id=np.int64, text=text, left_image_index=np.int64, right_image_index=np.int64,
          left_image_id=tfds.features.Text(), right_image_id=tfds.features.Text(),
          label=np.int32, identifier=text),  # lil-lab's `<split>-<set>-<pair>-<sentence>`
      # As `annotations_builder.SnliVe`'s; label into world.ENTAILMENT_LABELS.
      'snli_ve': lambda: dict(pair_id=text, text=text, **image_ref, label=np.int32),
      # As `annotations_builder.Vcr`'s: VCR's token lists and object names as JSON
      # text, references into the gt_images table's regions; labels -1 when unknown.
      'vcr': lambda: dict(annot_id=text, **image_ref, question=text, answer_choices=text,
                          rationale_choices=text, objects=text, answer_label=np.int32,
                          rationale_label=np.int32),
  }[table]()
  return features if table in IMAGE_TABLES else tfds.features.FeaturesDict(features)


_ID_FIELDS = dict(captions='caption_id', vqa='question_id', gqa='question_id', refexp='ref_id',
                  nlvr2='pair_id', snli_ve='pair_id', vcr='annot_id')


class VlpWorld(features_builder.SideFilesBuilder):
  """The embedded vision-language world: images, captions, VQA, GQA, refexp, NLVR2,
  SNLI-VE, ground-truth regions, VCR."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [_config(size, table) for size in WORLD_SIZES for table in TABLES]
  DEFAULT_CONFIG_NAME = 'default_images'

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return features_builder.LocalDatasetInfo(
        builder=self, description=__doc__,
        features=table_features(config.table, config.world.feature_dim),
        metadata=tfds.core.MetadataDict(
            num_object_classes=len(world_lib.OBJECT_CLASSES),
            num_attributes=len(world_lib.COLOURS),
            num_answers=len(world_lib.ANSWERS)),
        disable_shuffling=True)

  def _shard_iterators_per_split(self, dl_manager: tfds.download.DownloadManager
                                 ) -> dict[str, list[Callable[[], Iterator[Any]]]]:
    del dl_manager  # nothing to download
    config = self.builder_config
    world = world_lib.make_world(config.world)
    self.side_files[VOCAB_FILE] = _lines(vocab_lib.world_vocab(config.world))
    fingerprint = features_builder.image_ids_fingerprint(
        [scene.image_id for scene in world.scenes])
    self.info.metadata[features_builder.IMAGE_IDS_FINGERPRINT if config.table in IMAGE_TABLES
                       else features_builder.IMAGES_FINGERPRINT] = fingerprint
    if config.table == 'gt_images':
      # Its rows are the images table's rows, so it also records the images it matches.
      self.info.metadata[features_builder.IMAGES_FINGERPRINT] = fingerprint
    if config.table in IMAGE_TABLES:
      self.side_files[OBJECTS_FILE] = _lines(world_lib.OBJECT_CLASSES)
      self.side_files[ATTRIBUTES_FILE] = _lines(world_lib.COLOURS)
      step, num_images = config.images_per_shard, len(world.scenes)
      return {IMAGES_SPLIT: [
          functools.partial(_keyed_images, getattr(world, IMAGE_TABLES[config.table]),
                            range(start, min(start + step, num_images)))
          for start in range(0, num_images, step)]}
    if config.table in ('vqa', 'gqa'):
      self.side_files[ANSWERS_FILE] = _lines(world_lib.ANSWERS)
    rows = getattr(world, config.table)
    id_field = _ID_FIELDS[config.table]
    return {split: [functools.partial(_keyed_rows, rows[split], id_field)]
            for split in world_lib.SPLITS}


def _lines(items: Iterable[str]) -> str:
  return ''.join(f'{item}\n' for item in items)


def _keyed_images(image_examples: Callable[[range], Iterator[dict[str, Any]]], indices: range
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
  for example in image_examples(indices):
    yield example['index'], example


def _keyed_rows(rows: list[dict[str, Any]], id_field: str
                ) -> Iterator[tuple[int, dict[str, Any]]]:
  for row in rows:
    yield row[id_field], row


# ----------------------------------------------------------------------------
# Where a built table and its files live.


def dataset_dir(data_dir: str | os.PathLike[str], size: str, table: str) -> str:
  """The data directory of table `table` of world `size` under TFDS `data_dir`."""
  if table not in TABLES:
    raise ValueError(f'table must be one of {TABLES}, got {table!r}')
  return paths.join(data_dir, 'vlp_world', f'{size}_{table}', str(VlpWorld.VERSION))


def _stored_file(directory: str | os.PathLike[str], filename: str) -> str:
  path = paths.join(directory, filename)
  if not paths.path(path).is_file():
    raise FileNotFoundError(f'{path} does not exist: build the table first '
                            '(python -m vlpjax.data.build)')
  return path


def vocab_path(data_dir: str | os.PathLike[str], size: str, table: str = 'captions') -> str:
  """Path of the `vocab.txt` stored with a built table (every table has the same one)."""
  return _stored_file(dataset_dir(data_dir, size, table), VOCAB_FILE)


def answer_vocab(source: tfds.core.DatasetBuilder | str | os.PathLike[str]) -> list[str]:
  """The answer vocabulary stored with a vqa or gqa table, given its builder or data directory."""
  directory = source.data_dir if isinstance(source, tfds.core.DatasetBuilder) else source
  return paths.path(_stored_file(directory, ANSWERS_FILE)).read_text(
      encoding='utf-8').splitlines()
