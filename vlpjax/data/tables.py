"""The TFDS tables of the data contract: opening them, their files, reading records.

Layout (see the data contract): region features are stored once per image in an
images table; text tables (captions, vqa, gqa) refer to images by `image_index`.
`table_name` gives a table's TFDS name from the data config
(`input_pipeline.default_data_config`), `open_table` opens one of its splits
(building the embedded world first if it is missing), and `check_same_images`
refuses a text table built against other images than the images table holds.
The vocabulary and the answer vocabularies (VQA, GQA) are files stored with
the tables (`vocab_file`, `answer_vocab`); `dataset_info` is what a model
config must agree with.

Cost (benchmarks/input_pipeline.py, batches of 256 x 36 regions x 2048-d): most
of the input pipeline's time goes to reading the image records and copying the
features into the batch. Records are decoded straight from the proto (`RecordDecoder`);
region features and class distributions leave the host in their stored float16
(half the bytes to copy and to send to the devices; the train step widens them
to float32 on the device, exactly), unless `data.widen_features`; `cache_images`
keeps the images table in memory (by default when it takes at most
`cache_images_max_gib`), and batches are then gathered with one vectorised copy
per array (`ImageTable`). A table too large for memory can keep a raw copy of
its region arrays on local disk (`data.images_store_dir`): fixed-size rows in
memory-mapped .npy files, built once, gathered per batch the same way, without
reading or decoding records.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain.multiprocessing import SharedMemoryArray
from tensorflow_datasets.proto import tf_example_pb2

from vlpjax import paths
from vlpjax.data import features_builder
from vlpjax.data.tokenizer import read_vocab


IMAGE_KEYS = ('index', 'image_id', 'image_h', 'image_w', 'num_boxes', 'boxes', 'features',
              'object_ids', 'object_conf', 'attr_ids', 'attr_conf')
REGION_LABEL_KEYS = ('object_ids', 'object_conf', 'attr_ids', 'attr_conf', 'class_probs')
# Rows of a text table whose image ids are compared with the images table's when
# the text table stores no fingerprint of its images (built before it did).
ID_CHECK_ROWS = 64
# How long a process waits for another to build the embedded world.
WORLD_BUILD_TIMEOUT_SECONDS = 1800
# TFDS's metadata file: a table with it is prepared.
DATASET_INFO_FILE = 'dataset_info.json'
# Written last into a finished store of an images table's region arrays.
STORE_COMPLETE_FILE = 'COMPLETE'


# ----------------------------------------------------------------------------
# Tables of a data config.


def _data_dir(data_config: ml_collections.ConfigDict) -> str:
  return os.fspath(paths.path(data_config.data_dir or '~/tensorflow_datasets'))


def table_name(data_config: ml_collections.ConfigDict, table: str) -> str:
  """TFDS name ('dataset/config') of `table` in {'images', 'captions', 'vqa', 'gqa'}."""
  explicit = data_config.get(f'{table}_dataset')
  if explicit:
    return explicit
  if data_config.name != 'vlp_world':
    raise ValueError(f'data.{table}_dataset must name the TFDS table for dataset '
                     f'{data_config.name!r} (only vlp_world has default tables)')
  return f'vlp_world/{data_config.size}_{table}'


def _builder(data_config: ml_collections.ConfigDict, table: str) -> tfds.core.DatasetBuilder:
  """The table's builder, building the embedded world first if it is missing."""
  name = table_name(data_config, table)
  if name.startswith('vlp_world/'):
    from vlpjax.data import vlp_world  # pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder(name, data_dir=_data_dir(data_config))
  if not builder.is_prepared():
    if not (name.startswith('vlp_world/') and data_config.build_if_missing):
      raise FileNotFoundError(f'TFDS table {name!r} is not prepared under '
                              f'{_data_dir(data_config)}')
    _build_once(name, _data_dir(data_config))
    builder = tfds.builder(name, data_dir=_data_dir(data_config))
  return builder


def _build_once(name: str, data_dir: str) -> None:
  """Builds the world's table `name` unless another process is building it into the
  same `data_dir`, then waits for that one. On gs:// (shared by all hosts)
  process 0 builds; a local data_dir is claimed with a lock file, so that hosts
  sharing it (NFS) build it once and hosts with their own disks each build theirs."""
  if not paths.is_local(data_dir):
    if jax.process_index() == 0:
      _build_world_table(name, data_dir)
    else:
      _wait(name, data_dir, lambda: False)
    return
  lock = paths.path(data_dir) / f'{name.replace("/", "_")}.building'
  lock.parent.mkdir(parents=True, exist_ok=True)
  while not tfds.builder(name, data_dir=data_dir).is_prepared():
    try:
      os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # local: claimed atomically
    except FileExistsError:
      if time.time() - lock.stat().mtime > WORLD_BUILD_TIMEOUT_SECONDS:
        logging.warning('%s: removing a stale lock (a build that died?)', lock)
        lock.unlink(missing_ok=True)
      else:
        _wait(name, data_dir, lambda: not lock.exists())
      continue
    try:
      _build_world_table(name, data_dir)
    finally:
      lock.unlink(missing_ok=True)


def _build_world_table(name: str, data_dir: str) -> None:
  """Builds the embedded world's table `name` into `data_dir`; a remote data_dir
  (gs://) gets a local build copied up, since ArrayRecord writes local files only."""
  logging.info('Building the embedded dataset table %s under %s', name, data_dir)
  if paths.is_local(data_dir):
    tfds.builder(name, data_dir=data_dir).download_and_prepare()
    return
  with tempfile.TemporaryDirectory() as local_dir:
    built = tfds.builder(name, data_dir=local_dir)
    built.download_and_prepare()
    target = paths.path(data_dir) / os.path.relpath(built.data_dir, local_dir)
    files = sorted((os.path.join(root, f) for root, _, names in os.walk(built.data_dir)
                    for f in names), key=lambda f: os.path.basename(f) == DATASET_INFO_FILE)
    # dataset_info.json last: with it the table counts as prepared elsewhere.
    for file in files:
      destination = target / os.path.relpath(file, built.data_dir)
      destination.parent.mkdir(parents=True, exist_ok=True)
      paths.path(file).copy(destination, overwrite=True)
    logging.info('copied %d files of %s to %s', len(files), name, target)


def _wait(name: str, data_dir: str, given_up: Callable[[], bool]) -> None:
  """Waits until table `name` is prepared under `data_dir` by another process, or
  `given_up()` (its builder stopped)."""
  logging.info('waiting for another process to build %s under %s', name, data_dir)
  deadline = time.monotonic() + WORLD_BUILD_TIMEOUT_SECONDS
  while not tfds.builder(name, data_dir=data_dir).is_prepared() and not given_up():
    if time.monotonic() > deadline:
      raise TimeoutError(f'process {jax.process_index()}: {name} did not appear under '
                         f'{data_dir} within {WORLD_BUILD_TIMEOUT_SECONDS} s; is data_dir '
                         'the same directory on every host?')
    time.sleep(1)


def open_table(data_config: ml_collections.ConfigDict, table: str, split: str):
  """Split `split` of `table` (in {'images', 'captions', 'vqa', 'gqa'}) as a TFDS data source."""
  builder = _builder(data_config, table)
  if split not in builder.info.splits:
    raise ValueError(f'table {table_name(data_config, table)!r} has no split {split!r}; '
                     f'it has {sorted(builder.info.splits)}')
  return builder.as_data_source(split=split)


def _find_in_data_dirs(data_config: ml_collections.ConfigDict, tables: Sequence[str],
                       filename: str) -> str:
  """Path of `filename` stored with the first of `tables` that has it."""
  searched = []
  for table in tables:
    path = paths.join(_builder(data_config, table).data_dir, filename)
    if paths.path(path).is_file():
      return path
    searched.append(path)
  raise FileNotFoundError(f'{filename} not found; looked at {searched}')


def vocab_file(data_config: ml_collections.ConfigDict) -> str:
  """The vocabulary: `data.vocab_file` if set, else the dataset's `vocab.txt`."""
  if data_config.vocab_file:
    return os.fspath(paths.path(data_config.vocab_file))
  return _find_in_data_dirs(data_config, ('captions', 'images'), 'vocab.txt')


def answer_vocab(data_config: ml_collections.ConfigDict, table: str = 'vqa') -> list[str]:
  """The answer vocabulary (`answers.txt`) stored with a question table ('vqa', 'gqa')."""
  path = _find_in_data_dirs(data_config, (table,), 'answers.txt')
  return paths.path(path).read_text(encoding='utf-8').splitlines()


def dataset_info(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a model config must agree with, read from the dataset's metadata.

  Returns:
    feature_dim; num_object_classes (detector classes incl. background: the
    table's metadata, else the width of `class_probs`; None if neither);
    num_attributes (metadata; None if absent); max_object_id, max_attr_id (the
    largest ids in the table, from its metadata; None for tables built before
    it recorded them); vocab_size; num_answers (None without a vqa table);
    vocab_file; num_images.
  """
  images = _builder(data_config, 'images')
  features = images.info.features
  metadata = features_builder.stored_metadata(images)
  num_classes = metadata.get('num_object_classes')
  if num_classes is None and 'class_probs' in features:
    num_classes = features['class_probs'].shape[-1]
  vocab = vocab_file(data_config)
  has_vqa = bool(data_config.vqa_dataset) or data_config.name == 'vlp_world'
  return dict(
      feature_dim=features['features'].shape[-1],
      num_object_classes=num_classes,
      num_attributes=metadata.get('num_attributes'),
      max_object_id=metadata.get(features_builder.MAX_OBJECT_ID),
      max_attr_id=metadata.get(features_builder.MAX_ATTR_ID),
      vocab_size=len(read_vocab(vocab)),
      num_answers=len(answer_vocab(data_config)) if has_vqa else None,
      vocab_file=vocab,
      num_images=images.info.splits[data_config.images_split].num_examples,
  )


def check_same_images(data_config: ml_collections.ConfigDict, table: str, split: str,
                      images_table: str = 'images') -> None:
  """Raises ValueError unless text `table` was built against the images table
  (`images_table`: another table of the same images, row for row, e.g. the
  ground-truth regions of referring expressions, 'gt_images').

  Text rows refer to images by row, so an images table rebuilt under the same
  name (other images or another order) would silently pair text with the wrong
  images. Compares the fingerprint of the images table's ids stored in the text
  table when it was built with the images table's; a text table built before it
  stored one has the image ids of ID_CHECK_ROWS of its rows (of `split`)
  compared with the ids at their rows instead.
  """
  images = _builder(data_config, images_table)
  images_name, text_name = table_name(data_config, images_table), table_name(data_config, table)
  fix = (f'rebuild {text_name} against the images table as it is now '
         '(`python -m vlpjax.data.annotations_builder ... --overwrite`)')
  stored = features_builder.stored_metadata(_builder(data_config, table)).get(
      features_builder.IMAGES_FINGERPRINT)
  if stored is not None:
    current = features_builder.images_fingerprint(images)
    if stored != current:
      raise ValueError(
          f'text table {text_name} was built against other images than the images table '
          f'{images_name} holds now (image id fingerprints {stored} vs {current}: other '
          'images, or the same in another order, as after a rebuild), so its rows would '
          f'point at the wrong images; {fix}')
    return
  logging.warning('text table %s stores no fingerprint of its images table (it was built '
                  'before text tables stored one); comparing the image ids of %d of its rows '
                  'with %s', text_name, ID_CHECK_ROWS, images_name)
  text = Table(open_table(data_config, table, split), ('image_index', 'image_id'), name=text_name)
  rows = np.unique(np.linspace(0, len(text) - 1, min(len(text), ID_CHECK_ROWS)).astype(int))
  records = text.read(rows)
  image_rows = np.array([r['image_index'] for r in records], np.int64)
  image_table = Table(open_table(data_config, images_table, data_config.images_split),
                      ('image_id',), name=images_name)
  in_table = image_rows[(image_rows >= 0) & (image_rows < len(image_table))]
  table_ids = {int(i): as_text(r['image_id']) for i, r in zip(in_table, image_table.read(in_table))}
  wrong = [(int(row), int(image), as_text(r['image_id']), table_ids.get(int(image)))
           for row, image, r in zip(rows, image_rows, records)
           if table_ids.get(int(image)) != as_text(r['image_id'])]
  if wrong:
    row, image, want, got = wrong[0]
    raise ValueError(
        f'text table {text_name} does not match the images table {images_name}: '
        f'{len(wrong)} of {len(rows)} rows checked refer to an image row whose id is not '
        f'theirs (e.g. row {row}: image {want!r}, but row {image} of {images_name} is '
        f'{got!r}); {fix}')


# ----------------------------------------------------------------------------
# Reading records.


def as_text(value: Any) -> str:
  """A text feature as read (bytes, or a str) as a str."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _is_plain_tensor(feature: tfds.features.FeatureConnector) -> bool:
  return (type(feature) is tfds.features.Tensor  # pylint: disable=unidiomatic-typecheck
          and sum(d is None for d in feature.shape) <= 1
          and feature.to_json_content().encoding in ('none', 'bytes'))


class RecordDecoder:
  """Decodes the `keys` of serialized TFDS records straight from the proto.

  Same result as TFDS's own numpy decoding for flat records of tensors (raw or
  `encoding='bytes'`, at most one unknown dimension), sequences of scalars and
  text, at a fraction of its cost (it dominated the input pipeline's profile).
  `supports` says whether all `keys` are of that kind; other tables use TFDS's
  decoding.
  """

  def __init__(self, features: tfds.features.FeaturesDict, keys: Sequence[str]):
    self.specs = {}
    for key in keys:
      feature = features[key]
      if isinstance(feature, tfds.features.Text):
        self.specs[key] = ('text', None, ())
      elif _is_plain_tensor(feature):
        shape = tuple(-1 if d is None else d for d in feature.shape)
        self.specs[key] = (feature.to_json_content().encoding, feature.np_dtype, shape)
      elif (isinstance(feature, tfds.features.Sequence) and _is_plain_tensor(feature.feature)
            and feature.feature.shape == () and feature.feature.to_json_content().encoding
            == 'none'):
        self.specs[key] = ('none', feature.feature.np_dtype, (-1,))

  @classmethod
  def supports(cls, features: tfds.features.FeaturesDict, keys: Sequence[str]) -> bool:
    return len(cls(features, keys).specs) == len(keys)

  def __call__(self, serialized: bytes) -> dict[str, Any]:
    feature_map = tf_example_pb2.Example.FromString(serialized).features.feature
    record = {}
    for key, (kind, dtype, shape) in self.specs.items():
      feature = feature_map[key]
      if kind == 'text':
        record[key] = feature.bytes_list.value[0]
      elif kind == 'bytes':
        record[key] = np.frombuffer(feature.bytes_list.value[0], dtype).reshape(shape)
      else:
        values = (feature.int64_list.value if feature.HasField('int64_list')
                  else feature.float_list.value)
        array = np.asarray(values, dtype)
        record[key] = array.reshape(shape) if shape else array.item()
    return record


class Table:
  """Random access to the `keys` of a TFDS table (a `tfds.data_source` split)."""

  def __init__(self, source, keys: Sequence[str], *, name: str):
    features = source.dataset_info.features
    missing = [k for k in keys if k not in features]
    if missing:
      raise ValueError(f'table {name} lacks the features {missing} of the data contract')
    self.source = source
    self.features = features
    self.name = name
    self.decoder = (RecordDecoder(features, keys) if RecordDecoder.supports(features, keys)
                    else None)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Records `indices`, read in one batched ArrayRecord read."""
    indices = [int(i) for i in indices]
    if not indices:
      return []
    if self.decoder is None:
      return list(self.source.__getitems__(indices))
    return [self.decoder(r) for r in self.source.data_source.__getitems__(indices)]


def open_split(data_config: ml_collections.ConfigDict, table: str, split: str,
               keys: Sequence[str]) -> Table:
  """The `keys` of split `split` of `table` (e.g. 'snli_ve'), named as `table_name`."""
  return Table(open_table(data_config, table, split), keys, name=table_name(data_config, table))


def read_all(table: Table, chunk: int = 4096) -> list[dict[str, Any]]:
  """Every record of `table`, in row order, read `chunk` records at a time."""
  return [r for start in range(0, len(table), chunk)
          for r in table.read(range(start, min(start + chunk, len(table))))]


# float16 -> float32 by table lookup on the bits: exact, and ~3x faster than
# numpy's cast on CPUs without AVX-512 (it was a third of the input pipeline's time).
_FLOAT16_TO_FLOAT32 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _convert_into(destination: np.ndarray, source: np.ndarray) -> None:
  """destination[...] = source, fast for float16 -> float32."""
  if source.dtype == np.float16 and destination.dtype == np.float32:
    # mode='clip' (a no-op: every uint16 indexes the table) writes `out` directly;
    # the default mode buffers it, at twice the cost.
    np.take(_FLOAT16_TO_FLOAT32, source.view(np.uint16), out=destination, mode='clip')
  else:
    destination[...] = source


class _CachedArrays(dict):
  """A cached table's region arrays (a dict that can be weakly referenced)."""


# The cached tables of this process, by what their arrays depend on: the train
# pipeline and each evaluator share one copy of an images table while any uses it.
_CACHED_TABLES: weakref.WeakValueDictionary[str, _CachedArrays] = weakref.WeakValueDictionary()


class ImageTable:
  """Gathers the images of a batch: regions padded/truncated to `max_regions`.

  Reads each distinct image of a batch once, in one batched ArrayRecord read, and
  writes it straight into the batch arrays. With `cache=True` (or `cache=None` and
  the table taking at most `cache_max_gib`) the table is read once (in each
  process that gathers; the tables of a process that read the same arrays share
  them) and held in memory in its stored dtypes, as LXMERT's loader holds its
  features. With `store_dir` (a local directory) the same
  arrays live on disk instead, memory-mapped (`_open_store`): built from the
  table the first time, then shared by every process and worker of the host.
  """

  def __init__(self, source, max_regions: int, *, name: str, with_class_probs: bool,
               cache: bool | None = False, cache_max_gib: float = 4.0,
               widen_features: bool = False, shared_memory: bool = False,
               store_dir: str | None = None):
    if with_class_probs and 'class_probs' not in source.dataset_info.features:
      raise ValueError(f'images table {name} has no class_probs (detector class '
                       'distributions), which the ViLBERT/UNITER region objectives need')
    self.table = Table(source, IMAGE_KEYS + (('class_probs',) if with_class_probs else ()),
                       name=name)
    self.max_regions = max_regions
    self.name = name
    features = self.table.features
    self.feature_dim = features['features'].shape[-1]
    self.num_classes = features['class_probs'].shape[-1] if with_class_probs else None
    self.num_images = len(source)
    self.region_keys = ('feats', 'boxes') + tuple(
        k for k in REGION_LABEL_KEYS if with_class_probs or k != 'class_probs')
    self.stored_dtypes = {k: features[k if k != 'feats' else 'features'].np_dtype
                          for k in self.region_keys}
    cache_gib = self.num_images * self.max_regions * sum(
        np.dtype(self.stored_dtypes[k]).itemsize * int(np.prod(shape))
        for k, shape in self._region_shapes().items()) / 2**30
    # None: cache when it fits the budget.
    self.cache = cache_gib <= cache_max_gib if cache is None else cache
    stored = lambda key: np.float32 if widen_features else self.stored_dtypes[key]
    self.batch_dtypes = dict(feats=stored('feats'), boxes=np.float32, object_ids=np.int32,
                             object_conf=np.float32, attr_ids=np.int32, attr_conf=np.float32)
    if with_class_probs:
      self.batch_dtypes['class_probs'] = stored('class_probs')
    # In grain worker processes: the per-region vectors are made in shared memory,
    # which grain hands to the main process without copying them.
    self.shared_memory = shared_memory
    self._cached = None  # filled on first use, so worker processes are sent no arrays
    self._cache_key = json.dumps([os.fspath(source.dataset_info.data_dir), str(source.split),
                                  self._store_key(source)])
    self.store = None
    if store_dir is not None:
      if not paths.is_local(store_dir):
        raise ValueError(f'data.images_store_dir must be a directory on this machine (it '
                         f'is memory-mapped), got {store_dir!r}')
      self.store = os.path.join(paths.path(store_dir), f'{name.replace("/", "_")}-'
                                f'{self._store_key(source)}')
      self.cache = False
      self._open_store()  # built here, before any worker opens it

  def __getstate__(self) -> dict[str, Any]:
    return dict(self.__dict__, _cached=None)

  def _region_shapes(self) -> dict[str, tuple[int, ...]]:
    """Per-region shape of each region array."""
    shapes = dict(feats=(self.feature_dim,), boxes=(4,), object_ids=(), object_conf=(),
                  attr_ids=(), attr_conf=())
    if self.num_classes is not None:
      shapes['class_probs'] = (self.num_classes,)
    return shapes

  def _batch_zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros for a batch array; the per-region vectors [B, S, D] (features, boxes,
    class distributions) in shared memory with `shared_memory` (a new segment
    reads as zeros)."""
    if self.shared_memory and len(shape) == 3:
      return SharedMemoryArray(shape, dtype)
    return np.zeros(shape, dtype)

  def _allocate(self, n: int, slots: int, dtypes: dict[str, Any],
                zeros: Callable[..., np.ndarray] = np.zeros) -> dict[str, np.ndarray]:
    arrays = {k: zeros((n, slots) + shape, dtypes[k])
              for k, shape in self._region_shapes().items()}
    arrays.update(count=np.zeros((n,), np.int32), image_w=np.zeros((n,), np.float32),
                  image_h=np.zeros((n,), np.float32))
    return arrays

  def _regions(self, indices: np.ndarray) -> list[dict[str, Any]]:
    """Per image of `indices` (read from the table): size, count k and its first k
    regions per key."""
    regions = []
    for index, record in zip(indices, self.table.read(indices)):
      self._check(index, record)
      k = min(int(record['num_boxes']), self.max_regions)
      record['feats'] = record['features']
      regions.append(dict(image_w=record['image_w'], image_h=record['image_h'], count=k,
                          **{key: record[key][:k] for key in self.region_keys}))
    return regions

  def _write(self, out: dict[str, np.ndarray], regions: list[dict[str, Any]],
             rows_of_image: Sequence[Sequence[int]], first_slot: int) -> None:
    for image, rows in zip(regions, rows_of_image):
      k = image['count']
      for row in rows:
        out['count'][row] = k
        out['image_w'][row] = image['image_w']
        out['image_h'][row] = image['image_h']
        for key in self.region_keys:
          _convert_into(out[key][row, first_slot:first_slot + k], image[key])

  def _load_cache(self) -> None:
    self._cached = _CACHED_TABLES.get(self._cache_key)
    if self._cached is not None:
      return
    cached = _CachedArrays(self._allocate(self.num_images, self.max_regions, self.stored_dtypes))
    logging.info('Caching images table %s in memory (%.1f GiB)', self.name,
                 sum(a.nbytes for a in cached.values()) / 2**30)
    chunk = 256
    for start in range(0, self.num_images, chunk):
      indices = np.arange(start, min(start + chunk, self.num_images))
      self._write(cached, self._regions(indices), indices[:, None], 0)
    self._cached = _CACHED_TABLES[self._cache_key] = cached

  def _store_key(self, source) -> str:
    """What the stored arrays depend on: the table (its TFDS info, whose split
    sizes change with its content), the region count and the arrays kept."""
    info = source.dataset_info.as_json
    key = json.dumps([info, self.max_regions, self.region_keys,
                      {k: np.dtype(v).str for k, v in self.stored_dtypes.items()}])
    return hashlib.sha256(key.encode()).hexdigest()[:16]

  def _open_store(self) -> None:
    """Memory-maps the stored region arrays (read-only), building them first if
    the store is missing. Builders write into a directory of their own and
    rename it into place, so concurrent builders never see a partial store."""
    if not os.path.exists(os.path.join(self.store, STORE_COMPLETE_FILE)):
      building = f'{self.store}.{os.getpid()}.partial'
      os.makedirs(building, exist_ok=True)
      shapes = self._allocate(0, self.max_regions, self.stored_dtypes)
      arrays = {key: np.lib.format.open_memmap(
                    os.path.join(building, f'{key}.npy'), mode='w+', dtype=a.dtype,
                    shape=(self.num_images,) + a.shape[1:]) for key, a in shapes.items()}
      began, chunk = time.perf_counter(), 256
      for start in range(0, self.num_images, chunk):
        indices = np.arange(start, min(start + chunk, self.num_images))
        self._write(arrays, self._regions(indices), indices[:, None], 0)
        done = indices[-1] + 1
        if done == self.num_images or (start // chunk) % 40 == 39:
          elapsed = time.perf_counter() - began
          logging.info('Storing images table %s in %s: %d/%d images, ETA %.0f s', self.name,
                       self.store, done, self.num_images,
                       elapsed * (self.num_images - done) / done)
      for array in arrays.values():
        array.flush()
      del arrays
      open(os.path.join(building, STORE_COMPLETE_FILE), 'w', encoding='utf-8').close()
      try:
        os.rename(building, self.store)
      except OSError:  # another process stored it first
        shutil.rmtree(building, ignore_errors=True)
    self._cached = {key: np.load(os.path.join(self.store, f'{key}.npy'), mmap_mode='r')
                    for key in self._allocate(0, self.max_regions, self.stored_dtypes)}

  def gather(self, indices: np.ndarray, first_slot: int = 0) -> dict[str, np.ndarray]:
    """Region arrays of images `indices` [B], regions from slot `first_slot` on.

    Returns:
      feats [B, S, F] (stored dtype, or float32 with widen_features); boxes
      float32 [B, S, 4] (pixels); count int32 [B] (real regions); image_w,
      image_h float32 [B]; object_ids, attr_ids int32 [B, S]; object_conf,
      attr_conf float32 [B, S]; class_probs [B, S, C] (dtype as feats) if the
      table was opened with them; S = first_slot + max_regions, and slots before
      `first_slot` are zero.
    """
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_images):
      raise IndexError(f'images table {self.name} has {self.num_images} images; asked for '
                       f'{indices[(indices < 0) | (indices >= self.num_images)].tolist()}')
    if self.store is not None and self._cached is None:
      self._open_store()
    if self.cache and self._cached is None:
      self._load_cache()
    if self._cached is not None:
      return self._gather_cached(indices, first_slot)
    unique, inverse = np.unique(indices, return_inverse=True)
    rows_of_image = np.split(np.argsort(inverse, kind='stable'),
                             np.cumsum(np.bincount(inverse))[:-1])
    out = self._allocate(len(indices), first_slot + self.max_regions, self.batch_dtypes,
                         self._batch_zeros)
    self._write(out, self._regions(unique), rows_of_image, first_slot)
    return out

  def _gather_cached(self, indices: np.ndarray, first_slot: int) -> dict[str, np.ndarray]:
    """`gather` from the in-memory table or the store: one vectorised copy per
    array (the cached regions are zero past each image's count, as a batch's
    are)."""
    cached = self._cached
    out = {key: cached[key][indices] for key in ('count', 'image_w', 'image_h')}
    for key in self.region_keys:
      source = cached[key]  # [num_images, max_regions, ...]
      dtype = self.batch_dtypes[key]
      if first_slot == 0 and source.dtype == dtype:
        # `indices` were checked above; see _convert_into for mode='clip'.
        out[key] = np.take(source, indices, axis=0, mode='clip',
                           out=self._batch_zeros((len(indices),) + source.shape[1:], dtype))
        continue
      out[key] = self._batch_zeros(
          (len(indices), first_slot + source.shape[1]) + source.shape[2:], dtype)
      _convert_into(out[key][:, first_slot:], source[indices])
    return out

  def _check(self, index: int, record: dict[str, Any]) -> None:
    if record['index'] != index:
      raise ValueError(f'images table {self.name}: record {index} has index '
                       f'{record["index"]}; the table must be in index order')
    num_boxes = int(record['num_boxes'])
    if not len(record['boxes']) == len(record['features']) == num_boxes:
      raise ValueError(
          f'images table {self.name}: record {index} ({as_text(record["image_id"])}) has '
          f'num_boxes {num_boxes} but {len(record["boxes"])} boxes and '
          f'{len(record["features"])} feature rows')
    if record['image_w'] <= 0 or record['image_h'] <= 0:
      raise ValueError(f'images table {self.name}: record {index} '
                       f'({as_text(record["image_id"])}) has image size '
                       f'{record["image_w"]}x{record["image_h"]}')


def open_image_table(data_config: ml_collections.ConfigDict, table: str = 'images',
                     with_class_probs: bool = False) -> ImageTable:
  """The images table `table` of `data_config` (split `data.images_split`), read
  as its `cache_images`, `images_store_dir`, `widen_features` and
  `worker_count` fields say."""
  return ImageTable(
      open_table(data_config, table, data_config.images_split), data_config.max_regions,
      name=table_name(data_config, table), with_class_probs=with_class_probs,
      cache=data_config.cache_images, cache_max_gib=data_config.cache_images_max_gib,
      widen_features=data_config.widen_features, shared_memory=data_config.worker_count > 0,
      store_dir=data_config.images_store_dir)


def read_image_indices(table: Table, chunk: int = 4096) -> np.ndarray:
  """`image_index` of every record of text `table`, int64 [len(table)]."""
  logging.info('Reading the image index of every caption in %s (%d records)', table.name,
               len(table))
  return np.array([r['image_index'] for r in read_all(table, chunk)], np.int64)
