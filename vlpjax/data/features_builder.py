"""TFDS builders for images tables made from region-feature files users already have.

One builder per file format, each reading the files from TFDS's manual dir (or
absolute paths) and writing an ArrayRecord images table as the data contract
defines it: split `train`, examples in index order (record i has index == i),
features stored once per image.

  lxmert_tsv    LXMERT `*_obj36.tsv` files
  uniter_lmdb   UNITER image dirs (`feat_th*/` LMDB + `nbb_th*.json`)
  region_npy    per-image `.npz` (or Pythia `.npy` + `_info.npy`) folders
  vilbert_lmdb  ViLBERT pickled LMDBs, only with trust_pickle=True
  butd_hdf5     bottom-up-attention VQA `*.hdf5` files with their image-id index

Building runs two passes over the sources: the first decodes and validates every
record (see `formats.make_record`) and decides the index of each good one; the
second re-reads the good records and writes them shard by shard. Malformed
records raise (`on_error='raise'`, default) or are skipped and counted
(`on_error='skip'`); either way `ingest_report.json` is written next to the
dataset (when the build fails, beside where it would be: see
`SideFilesBuilder`), with `image_ids.txt` (one id per line, in index order) that
text builders use to map image ids to rows.

The table's metadata (`metadata.json`) records what it was built from (its
settings and source paths), a fingerprint of its ordered image ids, which text
tables store to be checked against by the pipeline, and the largest object and
attribute ids, which the label heads of a model config must cover. A table is
reused only when built again with the same settings; other settings are refused
unless told to overwrite (`--overwrite`).

Example (Python):
  config = ImagesConfig(name='coco', sources=('train2014_obj36.tsv',))
  LxmertTsv(config=config, data_dir=DATA).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=FEATURES))
  tfds.data_source('lxmert_tsv/coco', data_dir=DATA)['train'][0]
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from vlpjax import paths
from vlpjax.data import formats

IMAGES_SPLIT = 'train'
IMAGE_IDS_FILE = 'image_ids.txt'
REPORT_FILE = 'ingest_report.json'
DEFAULT_NUM_CLASSES = 'format'  # the format's own: 1601 for UNITER, none otherwise
# Keys of a table's metadata.
SETTINGS_KEY = 'build_settings'  # the config fields its content follows
SOURCES_KEY = 'source_paths'  # the files it was read from
IMAGE_IDS_FINGERPRINT = 'image_ids_fingerprint'  # images tables: of their own ids
IMAGES_FINGERPRINT = 'images_fingerprint'  # text tables: of their images table's ids
MAX_OBJECT_ID = 'max_object_id'  # images tables: the largest object/attribute ids
MAX_ATTR_ID = 'max_attr_id'


def images_features(feature_dim: int, num_classes: int | None) -> tfds.features.FeaturesDict:
  """The images-table features of the data contract ([N] = regions of the image)."""
  per_box = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
  features = dict(
      index=np.int64, image_id=tfds.features.Text(), image_h=np.int32, image_w=np.int32,
      num_boxes=np.int32,
      boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      # Raw bytes: TFDS's default float16 encoding goes through Python floats (~10x slower).
      features=tfds.features.Tensor(shape=(None, feature_dim), dtype=np.float16,
                                    encoding='bytes'),
      object_ids=per_box(np.int32), object_conf=per_box(np.float32),
      attr_ids=per_box(np.int32), attr_conf=per_box(np.float32))
  if num_classes is not None:
    features['class_probs'] = tfds.features.Tensor(shape=(None, num_classes), dtype=np.float16,
                                                   encoding='bytes')
  return tfds.features.FeaturesDict(features)


@dataclasses.dataclass(eq=False, kw_only=True)
class ImagesConfig(tfds.core.BuilderConfig):
  """Which files make one images table, and how to treat them.

  Attributes:
    sources: files/folders, relative to the manual dir or absolute; glob
      patterns allowed (matches are taken in sorted order).
    feature_dim: F, the region feature size (2048 for BUTD ResNet-101).
    num_classes: C of the detector class distribution to store as
      `class_probs`, None to store none, or 'format' for the format's default
      (UNITER's soft_labels: 1601; the other formats: none).
    on_error: 'raise' on the first malformed record, or 'skip' and count it.
    images_per_shard: images per ArrayRecord shard; a shard's examples are held
      in memory while it is written (36 x 2048 fp16 regions is ~150 KB/image).
    trust_pickle: allow pickled sources (ViLBERT LMDB, Pythia `_info.npy`).
      Unpickling runs code stored in the file: only for files you trust.
    image_sizes: a JSON of image sizes (COCO-style `images` list, e.g.
      `captions_train2014.json`, or {image_id: [h, w]}). UNITER: turns its
      normalised boxes into pixels (without it boxes stay normalised with
      image_h = image_w = 1); BUTD HDF5: the sizes, instead of recovering them
      from `spatial_features`.
    match: how `image_sizes` ids are matched: 'number' or 'exact' (see
      `formats.image_key`).
  """
  sources: tuple[str, ...] = ()
  feature_dim: int = 2048
  num_classes: int | None | str = DEFAULT_NUM_CLASSES
  on_error: str = 'raise'
  images_per_shard: int = 1000
  trust_pickle: bool = False
  image_sizes: str | None = None
  match: str = 'number'


def resolve_paths(patterns: Sequence[str], manual_dir: Callable[[], os.PathLike[str]]) -> list[str]:
  """Sources relative to the manual dir (asked for only when needed), globs expanded."""
  found = []
  for pattern in patterns:
    relative = paths.is_local(pattern) and not os.path.isabs(os.path.expanduser(pattern))
    full = paths.join(manual_dir(), pattern) if relative else os.fspath(paths.path(pattern))
    matches = _glob(full)
    if not matches:
      raise FileNotFoundError(f'source {pattern!r}: nothing matches {full}')
    found.extend(matches)
  return found


def _glob(pattern: str) -> list[str]:
  """The paths `pattern` (local or gs://; wildcards in its last part) matches, sorted."""
  location = paths.path(pattern)
  if not any(c in location.name for c in '*?['):
    return [pattern] if location.exists() else []
  return sorted(os.fspath(p) for p in location.parent.glob(location.name))


def image_ids_fingerprint(image_ids: Sequence[str]) -> str:
  """'<count>:<sha256 of the ids in index order>', of an images table: text
  tables refer to its images by row, so they hold only for these ids in this order."""
  digest = hashlib.sha256(''.join(f'{image_id}\n' for image_id in image_ids).encode('utf-8'))
  return f'{len(image_ids)}:{digest.hexdigest()}'


def stored_metadata(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """A built table's metadata (its `metadata.json`); {} if it has none."""
  metadata = builder.info.metadata
  # items() makes TFDS's LazyMetadataDict read the file; its get() would not.
  return dict(metadata.items()) if metadata is not None else {}


def config_settings(config: tfds.core.BuilderConfig, layout_fields: Sequence[str]
                    ) -> dict[str, Any]:
  """A builder config's own fields, less `layout_fields` (those that change only
  how the table is sharded), as JSON values: what a built table's content follows."""
  common = {field.name for field in dataclasses.fields(tfds.core.BuilderConfig)}
  settings = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
              if field.name not in common and field.name not in layout_fields}
  return json.loads(json.dumps(settings))


class TableExistsError(FileExistsError):
  """A table is already built under the name asked for, from other settings."""


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The DatasetInfo of a table that exists only where it is built: TFDS looks
  up the info of an unprepared dataset on its GCS bucket, in a fresh temporary
  directory it never removes (one per builder made); these tables are not there."""

  def initialize_from_bucket(self) -> None:
    pass


class SideFilesBuilder(tfds.core.ShardBasedBuilder):
  """A ShardBasedBuilder that writes extra files (reports, vocabularies) next to
  the generated dataset, from `self.side_files` filled during generation, and
  the ingest report `self.report` of builders that read records.

  The report is written also when the build fails, where no table is made: then
  beside where it would be, `<data_dir>/<dataset>/<config>/ingest_report.json`
  (the error names it). TFDS would reuse any table built under the builder's
  name whatever the config asks for now; these builders store `build_settings()`
  in the table's metadata and refuse (`TableExistsError`) a table built from
  other settings, unless the download mode overwrites it (`--overwrite`:
  `tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS`).

  ShardBasedBuilder writes shards in the order given without TFDS's shuffler,
  which needs TensorFlow once a split passes 1 GB.
  """
  side_files: dict[str, str]
  report: formats.ErrorReport | None

  def __init__(self, *, file_format: str = 'array_record', **kwargs: Any):
    super().__init__(file_format=file_format, **kwargs)

  def build_settings(self) -> dict[str, Any] | None:
    """What the table's content follows (JSON values), compared when it is built
    again; None: only the code decides it."""
    return None

  def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None,
                           **kwargs: Any) -> None:
    """TFDS's, refusing a table built from other settings (see the class
    docstring) and writing the ingest report of a failed build."""
    download_config = download_config or tfds.download.DownloadConfig()
    if self.is_prepared() and not download_config.download_mode.overwrite_dataset:
      self._check_settings()
    failed_report = paths.path(self.data_path.parent) / REPORT_FILE
    if failed_report.exists():
      failed_report.unlink()  # an earlier failed build's
    self.side_files, self.report = {}, None
    try:
      super().download_and_prepare(download_config=download_config, **kwargs)
    except Exception as e:
      if self.report is not None:
        self.report.write(failed_report)
        e.add_note(f'ingest report: {failed_report}')
      raise

  def _check_settings(self) -> None:
    """Raises TableExistsError if the built table was built from other settings."""
    wanted = self.build_settings()
    stored = stored_metadata(self)
    built = stored.get(SETTINGS_KEY)
    if wanted is None or built == wanted:
      return
    if built is None:
      changes = 'it was built before vlpjax recorded the settings of a table'
    else:
      changes = ', '.join(f'{key}: {built.get(key)!r} -> {value!r}'
                          for key, value in wanted.items() if built.get(key) != value)
    raise TableExistsError(
        f'{self.info.full_name} is already built, in {self.data_dir}, from '
        f'{stored.get(SOURCES_KEY, "sources it did not record")}, with other settings '
        f'than asked for now ({changes}). Pass --overwrite to rebuild it (in Python: '
        'download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS), or build it '
        'under another config name.')

  def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                            download_config: tfds.download.DownloadConfig | None = None) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    settings = self.build_settings()
    if settings is not None:
      self.info.metadata[SETTINGS_KEY] = settings
    if self.report is not None:
      self.side_files[REPORT_FILE] = json.dumps(self.report.to_dict(), indent=1)
    for name, text in self.side_files.items():
      (self.data_path / name).write_text(text)  # the incomplete dir until it is renamed

  def _manual_dir(self, dl_manager: tfds.download.DownloadManager
                  ) -> Callable[[], os.PathLike[str]]:
    """The manual dir, looked up lazily: TFDS raises its instructions if it is absent."""
    return lambda: dl_manager.manual_dir


class ImagesTableBuilder(SideFilesBuilder, abc.ABC):
  """Base of the images-table builders: validate, then write in index order."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [ImagesConfig(name='images', sources=('*',),
                                  description='every source in the manual dir')]
  FORMAT_NUM_CLASSES: int | None = None

  @property
  def num_classes(self) -> int | None:
    if self.builder_config.num_classes == DEFAULT_NUM_CLASSES:
      return self.FORMAT_NUM_CLASSES
    return self.builder_config.num_classes

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
        builder=self, description=self.__doc__,
        features=images_features(self.builder_config.feature_dim, self.num_classes),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def build_settings(self) -> dict[str, Any]:
    return config_settings(self.builder_config, ('images_per_shard',))

  def _image_sizes(self, dl_manager: tfds.download.DownloadManager
                   ) -> dict[str | int, tuple[int, int]] | None:
    """The config's `image_sizes` file, read; None without one."""
    config = self.builder_config
    if config.image_sizes is None:
      return None
    sizes_path, = resolve_paths([config.image_sizes], self._manual_dir(dl_manager))
    return formats.load_image_sizes(sizes_path, config.match)

  @abc.abstractmethod
  def _readers(self, sources: Sequence[str], dl_manager: tfds.download.DownloadManager
               ) -> list[formats.Reader]:
    """One reader per resolved source path."""

  def _shard_iterators_per_split(self, dl_manager: tfds.download.DownloadManager
                                 ) -> dict[str, list[Callable[[], Iterator[Any]]]]:
    config = self.builder_config
    sources = resolve_paths(config.sources, self._manual_dir(dl_manager))
    readers = self._readers(sources, dl_manager)
    self.report = report = formats.ErrorReport(config.on_error,
                                               source=f'{self.name}/{config.name}')
    image_ids, max_object_ids, max_attr_ids = [], [], []

    def on_record(record: formats.ImageRecord) -> None:
      image_ids.append(record.image_id)
      max_object_ids.append(int(record.object_ids.max()))
      max_attr_ids.append(int(record.attr_ids.max()))

    kept = formats.scan(readers, report, on_record)
    report.log()
    if not kept:
      raise ValueError(f'{self.name}/{config.name}: no valid images in {config.sources} '
                       f'({len(report.skipped)} skipped, by reason: '
                       f'{report.to_dict()["by_reason"]})')
    self.side_files[IMAGE_IDS_FILE] = ''.join(f'{image_id}\n' for image_id in image_ids)
    # The largest ids, so that a model's label heads are checked without a scan.
    self.info.metadata.update({
        SOURCES_KEY: sources, IMAGE_IDS_FINGERPRINT: image_ids_fingerprint(image_ids),
        MAX_OBJECT_ID: max(max_object_ids), MAX_ATTR_ID: max(max_attr_ids)})
    step = config.images_per_shard
    return {IMAGES_SPLIT: [functools.partial(_write_images, kept[start:start + step], start)
                           for start in range(0, len(kept), step)]}


def _write_images(records: Sequence[tuple[formats.Reader, Any]], first_index: int
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
  """Second pass: the validated records, keyed and indexed from `first_index`."""
  for index, (reader, key) in enumerate(records, start=first_index):
    yield index, reader.decode(key, reader.fetch(key)).as_example(index)


_MANUAL = """Place the region-feature files in the manual dir (`--manual_dir`, default
`<data_dir>/downloads/manual/`) or give absolute paths in the config's `sources`."""


class LxmertTsv(ImagesTableBuilder):
  """Images table from LXMERT region-feature TSVs (`*_obj36.tsv`)."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
E.g. `train2014_obj36.tsv`, `val2014_obj36.tsv` (mscoco_imgfeat) or `vg_gqa_obj36.tsv`."""
  BUILDER_CONFIGS = [
      ImagesConfig(name='images', sources=('*.tsv',), description='every TSV in the manual dir'),
      ImagesConfig(name='coco', sources=('train2014_obj36.tsv', 'val2014_obj36.tsv')),
      ImagesConfig(name='vg_gqa', sources=('vg_gqa_obj36.tsv',)),
  ]

  def _readers(self, sources, dl_manager):
    return [formats.LxmertTsvReader(path, self.builder_config.feature_dim) for path in sources]


class UniterLmdb(ImagesTableBuilder):
  """Images table from UNITER image dirs: `feat_th*` LMDB plus `nbb_th*.json`."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
Each source is a UNITER image dir such as `coco_train2014/` holding one LMDB dir
`feat_th0.2_max100_min10/` and its box counts `nbb_th0.2_max100_min10.json`, or
an LMDB dir itself (the JSON is then its sibling, `feat_` renamed `nbb_` + .json)."""
  FORMAT_NUM_CLASSES = 1601

  def _readers(self, sources, dl_manager):
    config = self.builder_config
    return [formats.UniterLmdbReader(lmdb_path, box_counts, config.feature_dim,
                                     self.num_classes, self._image_sizes(dl_manager),
                                     config.match)
            for lmdb_path, box_counts in map(uniter_lmdb_paths, sources)]


def uniter_lmdb_paths(source: str) -> tuple[str, str]:
  """(LMDB dir, box-count JSON) of a UNITER image dir or LMDB dir."""
  source = source.rstrip('/')
  if not paths.path(source).joinpath('data.mdb').exists():
    lmdbs = _glob(paths.join(source, 'feat_*'))
    if len(lmdbs) != 1:
      raise FileNotFoundError(f'{source}: expected one LMDB dir feat_* in it, found '
                              f'{[os.path.basename(p) for p in lmdbs]}; name the LMDB dir')
    source = lmdbs[0]
  name = os.path.basename(source)
  box_counts = paths.join(os.path.dirname(source), name.replace('feat', 'nbb', 1) + '.json')
  if not paths.path(box_counts).exists():
    raise FileNotFoundError(f'{source}: its box-count JSON {box_counts} is missing')
  return source, box_counts


class RegionNpy(ImagesTableBuilder):
  """Images table from per-image region files (`<id>.npz`, or `<id>.npy` +
  `<id>_info.npy`), VisualBERT/Pythia style; image id = file stem."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
Each source is a folder of per-image files."""

  def _readers(self, sources, dl_manager):
    config = self.builder_config
    return [formats.NpyFolderReader(path, config.feature_dim, self.num_classes,
                                    config.trust_pickle) for path in sources]


class VilbertLmdb(ImagesTableBuilder):
  """Images table from ViLBERT's LMDB of pickled dicts (needs trust_pickle=True:
  unpickling runs code stored in the file)."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
Each source is a ViLBERT LMDB (e.g. `coco_trainval_resnext152_faster_rcnn_genome.lmdb`)."""

  def _readers(self, sources, dl_manager):
    config = self.builder_config
    return [formats.VilbertLmdbReader(path, config.feature_dim, self.num_classes,
                                      config.trust_pickle) for path in sources]


class ButdHdf5(ImagesTableBuilder):
  """Images table from the bottom-up-attention VQA code's HDF5 files
  (`formats.ButdHdf5Reader`): image sizes from `image_sizes`, else recovered
  from `spatial_features`."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
Each source is an HDF5 file such as `train36.hdf5`, with its index
`train36_imgid2idx.pkl` (or .json) beside it unless the file holds `image_ids`."""
  BUILDER_CONFIGS = [
      ImagesConfig(name='images', sources=('*.hdf5',),
                   description='every HDF5 in the manual dir'),
      ImagesConfig(name='coco', sources=('train36.hdf5', 'val36.hdf5')),
  ]

  def _readers(self, sources, dl_manager):
    config = self.builder_config
    sizes = self._image_sizes(dl_manager)
    return [formats.ButdHdf5Reader(path, config.feature_dim, sizes, config.match)
            for path in sources]


BUILDERS = {'lxmert_tsv': LxmertTsv, 'uniter_lmdb': UniterLmdb, 'region_npy': RegionNpy,
            'vilbert_lmdb': VilbertLmdb, 'butd_hdf5': ButdHdf5}


def read_image_ids(images: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
  """Image ids of an images table (TFDS name, e.g. 'lxmert_tsv/coco'), in index
  order (see `table_image_ids`)."""
  try:
    builder = tfds.builder(images, data_dir=data_dir)
  except ValueError as e:  # TFDS's "not found" errors
    raise FileNotFoundError(f'images table {images!r} is not built under {data_dir}; '
                            'build it first') from e
  if not builder.is_prepared():
    raise FileNotFoundError(f'images table {images!r} is not built under {data_dir}; '
                            'build it first')
  return table_image_ids(builder)


def table_image_ids(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Image ids of a built images table, in index order.

  Reads `image_ids.txt` written beside the table; for tables without it (e.g.
  the embedded world) reads the `image_id` of every record.
  """
  ids_file = paths.path(builder.data_dir) / IMAGE_IDS_FILE
  if ids_file.exists():
    return ids_file.read_text().splitlines()
  source = builder.as_data_source(split=IMAGES_SPLIT)
  return [source[i]['image_id'].decode() for i in range(len(source))]


def images_fingerprint(builder: tfds.core.DatasetBuilder) -> str:
  """`image_ids_fingerprint` of a built images table: stored when it was built,
  or, for older tables, computed from its image ids."""
  stored = stored_metadata(builder).get(IMAGE_IDS_FINGERPRINT)
  return stored or image_ids_fingerprint(table_image_ids(builder))


def download_config(manual_dir: str | None, overwrite: bool) -> tfds.download.DownloadConfig:
  """The builders' command lines' download config: `overwrite` rebuilds a built table."""
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  return tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: build one images table."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('format', choices=sorted(BUILDERS))
  parser.add_argument('--name', default='images', help='config name: <format>/<name>')
  parser.add_argument('--sources', nargs='+', required=True)
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--manual_dir', default=None)
  parser.add_argument('--feature_dim', type=int, default=2048)
  parser.add_argument('--num_classes', default=DEFAULT_NUM_CLASSES,
                      help="an int, 'none', or 'format' for the format's default")
  parser.add_argument('--on_error', choices=formats.ON_ERROR_CHOICES, default='raise')
  parser.add_argument('--images_per_shard', type=int, default=1000)
  parser.add_argument('--trust_pickle', action='store_true')
  parser.add_argument('--image_sizes', default=None)
  parser.add_argument('--match', choices=('number', 'exact'), default='number')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild the table if one is built under this name (without it, '
                      'one built from other settings is an error)')
  args = parser.parse_args(argv)
  num_classes = {'none': None, DEFAULT_NUM_CLASSES: DEFAULT_NUM_CLASSES}.get(
      args.num_classes.lower(), args.num_classes)
  config = ImagesConfig(
      name=args.name, sources=tuple(args.sources), feature_dim=args.feature_dim,
      num_classes=num_classes if num_classes in (None, DEFAULT_NUM_CLASSES) else int(num_classes),
      on_error=args.on_error, images_per_shard=args.images_per_shard,
      trust_pickle=args.trust_pickle, image_sizes=args.image_sizes, match=args.match)
  builder = BUILDERS[args.format](config=config, data_dir=args.data_dir)
  builder.download_and_prepare(download_config=download_config(args.manual_dir, args.overwrite))
  print(f'{builder.info.full_name}: {builder.info.splits[IMAGES_SPLIT].num_examples} '
        f'images in {builder.data_dir}')


if __name__ == '__main__':
  main()
