"""Streaming pretraining input pipeline: TFDS ArrayRecord tables -> global batches.

Layout (see the data contract): region features are stored once per image in an
images table; text tables (captions, vqa) refer to images by `image_index`. The
pipeline is a grain `MapDataset` over text-record indices:

  range(num_sentences) -> this process's shard -> shuffle (reseeded each epoch)
  -> repeat forever -> batch of indices -> `BatchAssembler` (one vectorised step
  per batch: read the text records, draw negatives, tokenise, gather the image
  records of the batch in one ArrayRecord read, build each design's region inputs)

so an iterator's state is one integer per stream (grain's), restores exactly,
and works with grain's orbax checkpoint handler. Batches become global
`jax.Array`s with the batch axis over the mesh's data axes.

Cost (benchmarks/input_pipeline.py, batches of 256 x 36 regions x 2048-d): most
of it is reading the image records and copying the features into the batch.
Records are decoded straight from the proto (`RecordDecoder`); region features
and class distributions leave the host in their stored float16 (half the bytes
to copy and to send to the devices; the train step widens them to float32 on
the device, exactly), unless `data.widen_features`; `cache_images` keeps the
images table in memory (by default when it takes at most
`cache_images_max_gib`), and batches are then gathered with one vectorised copy
per array.

Pair sampling. Every random choice for an example is a hash of (seed, epoch,
sentence index, stream): deterministic per example, independent of batch size,
worker count and process count, and vectorised over the batch (a numpy Generator
per example would cost tens of microseconds of a ~300 us budget). Mismatches
follow the design's `pairing` (`vlpjax.models.design`): the sentence replaced by
one about another image; the image replaced by that of a sentence about another
image (negatives from the split's own images); or `[CLS] a [SEP] b [SEP]` with b
another caption of the same image (matched) or of another image. `match_label`
is in the design's convention (`Design.matched_label`).

Regions. Detector order is kept and truncated to `max_regions`; padded slots are
zero with `region_mask` 0. A design may put slots before the detector regions
(`Design.leading_slots`, filled by the design: ViLBERT's [IMG]) and gives its own
location features (`Design.location_features`). `class_probs` is emitted only
for the designs whose objectives use it (`Design.needs_class_probs`): [B, R, C].

Image QA (`data.qa=True`, designs with `recipe.image_qa`): the sentence pool is
the captions followed by the VQA questions; a question keeps its soft answer
scores, `qa_valid` is 1 only for a matched question.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Sequence

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from grain.multiprocessing import SharedMemoryArray
from tensorflow_datasets.proto import tf_example_pb2

from vlpjax.data import features_builder
from vlpjax.data.tokenizer import BertTokenizer, read_vocab
from vlpjax.models import design as design_lib
# Attempts at drawing a sentence about another image before giving up.
MAX_NEGATIVE_DRAWS = 32
# Rows of a text table whose image ids are compared with the images table's when
# the text table stores no fingerprint of its images (built before it did).
ID_CHECK_ROWS = 64


def default_data_config() -> ml_collections.ConfigDict:
  """Data section of a run config."""
  return ml_collections.ConfigDict(dict(
      name='vlp_world',       # TFDS dataset; 'vlp_world' is the embedded world
      size='default',         # embedded world size: 'default' or 'tiny'
      data_dir=None,          # None: ~/tensorflow_datasets
      # Full TFDS names of the tables ('dataset/config'); None: the embedded
      # world's `<size>_<table>` configs.
      images_dataset=None,
      captions_dataset=None,
      vqa_dataset=None,
      images_split='train',   # the images table holds every image in one split
      vocab_file=None,        # None: the dataset's vocab.txt; or a BERT vocab path
      lowercase=None,         # None: follow the vocabulary (cased vocab: no lowercasing)
      max_text_len=20,
      max_regions=36,
      mismatch_prob=0.5,
      qa=False,               # LXMERT image-QA targets from the vqa table
      # Hold the images table in memory, in each process that reads it (LXMERT's
      # loader does): images x max_regions x (feature_dim x 2 + 24) bytes, about 4x
      # faster batches. None: cache when that is at most cache_images_max_gib.
      cache_images=None,
      cache_images_max_gib=4.0,
      # False: region_feats/class_probs in the table's dtype (float16), widened on the
      # device by the train step; True: widened to float32 on the host.
      widen_features=False,
      worker_count=0,         # grain worker processes; 0: a prefetch thread in-process
      worker_buffer_size=2,   # batches buffered per worker
      prefetch_batches=2,     # batches prefetched in-process (worker_count=0)
      seed=None,              # None: the run seed; an int fixes the data order alone
      build_if_missing=True,  # build the embedded world if it is not under data_dir
  ))


# ----------------------------------------------------------------------------
# Tables.


def _data_dir(data_config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(data_config.data_dir or '~/tensorflow_datasets')


def table_name(data_config: ml_collections.ConfigDict, table: str) -> str:
  """TFDS name ('dataset/config') of `table` in {'images', 'captions', 'vqa'}."""
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
    logging.info('Building the embedded dataset table %s under %s', name,
                 _data_dir(data_config))
    builder.download_and_prepare()
  return builder


def _open(data_config: ml_collections.ConfigDict, table: str, split: str):
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
    path = os.path.join(_builder(data_config, table).data_dir, filename)
    if os.path.isfile(path):
      return path
    searched.append(path)
  raise FileNotFoundError(f'{filename} not found; looked at {searched}')


def vocab_file(data_config: ml_collections.ConfigDict) -> str:
  """The vocabulary: `data.vocab_file` if set, else the dataset's `vocab.txt`."""
  if data_config.vocab_file:
    return os.path.expanduser(data_config.vocab_file)
  return _find_in_data_dirs(data_config, ('captions', 'images'), 'vocab.txt')


def answer_vocab(data_config: ml_collections.ConfigDict) -> list[str]:
  """The VQA answer vocabulary (`answers.txt` stored with the vqa table)."""
  path = _find_in_data_dirs(data_config, ('vqa',), 'answers.txt')
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


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


def check_same_images(data_config: ml_collections.ConfigDict, table: str, split: str) -> None:
  """Raises ValueError unless text `table` was built against the images table.

  Text rows refer to images by row, so an images table rebuilt under the same
  name (other images or another order) would silently pair text with the wrong
  images. Compares the fingerprint of the images table's ids stored in the text
  table when it was built with the images table's; a text table built before it
  stored one has the image ids of ID_CHECK_ROWS of its rows (of `split`)
  compared with the ids at their rows instead.
  """
  images = _builder(data_config, 'images')
  images_name, text_name = table_name(data_config, 'images'), table_name(data_config, table)
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
  text = Table(_open(data_config, table, split), ('image_index', 'image_id'), name=text_name)
  rows = np.unique(np.linspace(0, len(text) - 1, min(len(text), ID_CHECK_ROWS)).astype(int))
  records = text.read(rows)
  image_rows = np.array([r['image_index'] for r in records], np.int64)
  image_table = Table(_open(data_config, 'images', data_config.images_split), ('image_id',),
                      name=images_name)
  in_table = image_rows[(image_rows >= 0) & (image_rows < len(image_table))]
  table_ids = {int(i): _text(r['image_id']) for i, r in zip(in_table, image_table.read(in_table))}
  wrong = [(int(row), int(image), _text(r['image_id']), table_ids.get(int(image)))
           for row, image, r in zip(rows, image_rows, records)
           if table_ids.get(int(image)) != _text(r['image_id'])]
  if wrong:
    row, image, want, got = wrong[0]
    raise ValueError(
        f'text table {text_name} does not match the images table {images_name}: '
        f'{len(wrong)} of {len(rows)} rows checked refer to an image row whose id is not '
        f'theirs (e.g. row {row}: image {want!r}, but row {image} of {images_name} is '
        f'{got!r}); {fix}')


# ----------------------------------------------------------------------------
# Per-example randomness: a hash of integer keys.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection on uint64 with good avalanche."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hashed_uniform(*keys: int | np.ndarray) -> np.ndarray:
  """Uniform floats in [0, 1) that depend only on the integer `keys` (broadcast)."""
  with np.errstate(over='ignore'):
    h = np.zeros(np.broadcast_shapes(*(np.shape(k) for k in keys)), np.uint64)
    for key in keys:
      h = _mix(h ^ (np.asarray(key).astype(np.uint64) + _GOLDEN))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _draw_index(u: np.ndarray, n: int | np.ndarray) -> np.ndarray:
  """Integers uniform in [0, n) from uniforms `u`."""
  return np.minimum((u * n).astype(np.int64), n - 1)


# Streams of `hashed_uniform`: one per independent choice.
_MISMATCH, _NEGATIVE, _PARTNER = 0, 1, 2


# ----------------------------------------------------------------------------
# Reading and assembling.


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


IMAGE_KEYS = ('index', 'image_id', 'image_h', 'image_w', 'num_boxes', 'boxes', 'features',
              'object_ids', 'object_conf', 'attr_ids', 'attr_conf')
REGION_LABEL_KEYS = ('object_ids', 'object_conf', 'attr_ids', 'attr_conf', 'class_probs')


def _is_plain_tensor(feature: tfds.features.FeatureConnector) -> bool:
  return (type(feature) is tfds.features.Tensor  # pylint: disable=unidiomatic-typecheck
          and sum(d is None for d in feature.shape) <= 1
          and feature.to_json_content().encoding in ('none', 'bytes'))


class RecordDecoder:
  """Decodes the `keys` of serialized TFDS records straight from the proto.

  Same result as TFDS's own numpy decoding for flat records of tensors (raw or
  `encoding='bytes'`, at most one unknown dimension), sequences of scalars and
  text, at a fraction of its cost (it dominated the pipeline's profile).
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


# float16 -> float32 by table lookup on the bits: exact, and ~3x faster than
# numpy's cast on CPUs without AVX-512 (it was a third of the pipeline's time).
_FLOAT16_TO_FLOAT32 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _convert_into(destination: np.ndarray, source: np.ndarray) -> None:
  """destination[...] = source, fast for float16 -> float32."""
  if source.dtype == np.float16 and destination.dtype == np.float32:
    # mode='clip' (a no-op: every uint16 indexes the table) writes `out` directly;
    # the default mode buffers it, at twice the cost.
    np.take(_FLOAT16_TO_FLOAT32, source.view(np.uint16), out=destination, mode='clip')
  else:
    destination[...] = source


class ImageTable:
  """Gathers the images of a batch: regions padded/truncated to `max_regions`.

  Reads each distinct image of a batch once, in one batched ArrayRecord read, and
  writes it straight into the batch arrays. With `cache=True` (or `cache=None` and
  the table taking at most `cache_max_gib`) the table is read once (in each
  process that gathers) and held in memory in its stored dtypes, as LXMERT's
  loader holds its features.
  """

  def __init__(self, source, max_regions: int, *, name: str, with_class_probs: bool,
               cache: bool | None = False, cache_max_gib: float = 4.0,
               widen_features: bool = False, shared_memory: bool = False):
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
    cached = self._allocate(self.num_images, self.max_regions, self.stored_dtypes)
    logging.info('Caching images table %s in memory (%.1f GiB)', self.name,
                 sum(a.nbytes for a in cached.values()) / 2**30)
    chunk = 256
    for start in range(0, self.num_images, chunk):
      indices = np.arange(start, min(start + chunk, self.num_images))
      self._write(cached, self._regions(indices), indices[:, None], 0)
    self._cached = cached

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
    """`gather` from the in-memory table: one vectorised copy per array (the
    cached regions are zero past each image's count, as a batch's are)."""
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
          f'images table {self.name}: record {index} ({_text(record["image_id"])}) has '
          f'num_boxes {num_boxes} but {len(record["boxes"])} boxes and '
          f'{len(record["features"])} feature rows')
    if record['image_w'] <= 0 or record['image_h'] <= 0:
      raise ValueError(f'images table {self.name}: record {index} '
                       f'({_text(record["image_id"])}) has image size '
                       f'{record["image_w"]}x{record["image_h"]}')


def region_inputs(design: str | design_lib.Design, images: dict[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
  """The design's region inputs (see module docstring), in place where possible.

  Args:
    design: the model's design, or its name.
    images: `ImageTable.gather(indices, first_slot=design.leading_slots)`.

  Returns:
    region_feats [B, S, F] (as gathered), region_loc float32 [B, S, L],
    region_mask int32 [B, S] and the per-region labels; S = leading slots +
    max_regions.
  """
  design = design_lib.as_design(design)
  first = design.leading_slots
  feats, boxes, count = images['feats'], images['boxes'], images['count']
  slot = np.arange(feats.shape[1])[None, :]
  mask = (slot >= first) & (slot < first + count[:, None])
  size = np.stack([images['image_w'], images['image_h']], -1)[:, None, :]  # [B, 1, 2]
  corners = boxes / np.concatenate([size, size], -1)                      # [B, S, 4]
  loc = design.location_features(corners) * mask[..., None]
  if design.fill_leading_slots is not None:
    design.fill_leading_slots(feats, loc, mask, count)
  labels = {k: images[k] for k in REGION_LABEL_KEYS if k in images}
  return dict(region_feats=feats, region_loc=loc.astype(np.float32),
              region_mask=mask.astype(np.int32), **labels)


def region_batch(design: str | design_lib.Design, images: ImageTable,
                 image_indices: np.ndarray) -> dict[str, np.ndarray]:
  """The design's region inputs for images `image_indices` [B] of `images`:
  region_feats [B, S, F], region_loc [B, S, L], region_mask [B, S] and the
  per-region labels (see `region_inputs`); `design` is one or its name."""
  design = design_lib.as_design(design)
  return region_inputs(design, images.gather(image_indices, first_slot=design.leading_slots))


@dataclasses.dataclass(frozen=True)
class CaptionGroups:
  """The captions of each image, for drawing another caption of the same image.

  order: caption indices sorted by image [S]; start: [num_images + 1], image i's
  captions are order[start[i]:start[i + 1]]; rank: position of each caption in order.
  """
  order: np.ndarray
  start: np.ndarray
  rank: np.ndarray

  @classmethod
  def from_image_index(cls, image_index: np.ndarray, num_images: int) -> CaptionGroups:
    order = np.argsort(image_index, kind='stable')
    start = np.searchsorted(image_index[order], np.arange(num_images + 1))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return cls(order=order, start=start, rank=rank)

  def partner(self, caption: np.ndarray, image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Another caption of `image` for each `caption` [B] (itself when alone), by `u`."""
    first, count = self.start[image], self.start[image + 1] - self.start[image]
    others = np.maximum(count - 1, 1)
    pick = _draw_index(u, others)
    pick += pick >= self.rank[caption] - first  # skip the caption itself
    return np.where(count > 1, self.order[first + np.minimum(pick, count - 1)], caption)


@dataclasses.dataclass
class BatchAssembler:
  """Turns a batch of positions in the shuffled sentence stream into model inputs.

  Called as `assembler(batch_number, sentence_indices [B])` by grain; position
  `batch_number * B + j` of this process's stream is example j.
  """
  design: design_lib.Design
  tokenizer: BertTokenizer
  images: ImageTable
  sentences: Sequence[Table]     # in index order: captions[, vqa]
  shard_size: int                # sentences per epoch in this process's shard
  seed: int
  mismatch_prob: float
  num_answers: int | None = None
  caption_groups: CaptionGroups | None = None  # VisualBERT's matched second captions

  def __post_init__(self):
    self._offsets = np.cumsum([0] + [len(s) for s in self.sentences])
    self.num_sentences = int(self._offsets[-1])

  def read_sentences(self, indices: np.ndarray) -> list[dict[str, Any]]:
    """Records of sentence `indices` from whichever table holds each."""
    table = np.searchsorted(self._offsets, indices, side='right') - 1
    records = [None] * len(indices)
    for t, source in enumerate(self.sentences):
      rows = np.flatnonzero(table == t)
      if rows.size:
        for row, record in zip(rows, source.read(indices[rows] - self._offsets[t])):
          records[row] = record
    return records

  def _sentence_text(self, record: dict[str, Any]) -> str:
    return _text(record['text'] if 'text' in record else record['question'])

  def _negative_sentences(self, anchor: np.ndarray, anchor_image: np.ndarray,
                          epoch: np.ndarray) -> list[dict[str, Any]]:
    """For each anchor, the record of a random sentence about another image."""
    n = self.num_sentences
    if n < 2:
      raise ValueError(f'{n} sentence(s): pairs need sentences about two images')
    records = [None] * len(anchor)
    todo = np.arange(len(anchor))
    for attempt in range(MAX_NEGATIVE_DRAWS):
      if not todo.size:
        return records
      u = hashed_uniform(self.seed, epoch[todo], anchor[todo], _NEGATIVE, attempt)
      candidate = _draw_index(u, n - 1)
      candidate += candidate >= anchor[todo]  # never the anchor itself
      found = self.read_sentences(candidate)
      ok = self._image_index(candidate, found) != anchor_image[todo]
      for row, i in zip(todo[ok], np.flatnonzero(ok)):
        records[row] = found[i]
      todo = todo[~ok]
    if not todo.size:
      return records
    raise ValueError(f'no sentence about another image found in {MAX_NEGATIVE_DRAWS} '
                     f'draws for sentences {anchor[todo].tolist()}: does the text table '
                     'describe more than one image?')

  def _image_index(self, sentences: np.ndarray, records: list[dict[str, Any]]) -> np.ndarray:
    image = np.array([r['image_index'] for r in records], np.int64).reshape(-1)
    bad = (image < 0) | (image >= self.images.num_images)
    if bad.any():
      raise ValueError(f'sentences {sentences[bad].tolist()} refer to images '
                       f'{image[bad].tolist()} outside the images table '
                       f'{self.images.name} ({self.images.num_images} images)')
    return image

  def __call__(self, batch_number: int, anchor: np.ndarray) -> dict[str, np.ndarray]:
    anchor = np.asarray(anchor, np.int64)
    b = len(anchor)
    epoch = (batch_number * b + np.arange(b)) // self.shard_size
    records = self.read_sentences(anchor)
    anchor_image = self._image_index(anchor, records)
    mismatched = hashed_uniform(self.seed, epoch, anchor, _MISMATCH) < self.mismatch_prob
    swap = np.flatnonzero(mismatched)
    negatives = self._negative_sentences(anchor[swap], anchor_image[swap], epoch[swap])
    texts = [self._sentence_text(r) for r in records]
    pairs = None
    image_index = anchor_image.copy()
    if self.design.pairing == design_lib.REPLACE_IMAGE:
      # The image is that of a random sentence about another image, so negatives
      # come from this split's images.
      image_index[swap] = self._image_index(anchor[swap], negatives)
    elif self.design.pairing == design_lib.SECOND_CAPTION:
      keep = np.flatnonzero(~mismatched)
      pairs = [None] * b
      for row, text in zip(keep, self._partner_captions(anchor[keep], anchor_image[keep],
                                                        epoch[keep])):
        pairs[row] = text
      for row, record in zip(swap, negatives):
        pairs[row] = self._sentence_text(record)
    else:
      for row, record in zip(swap, negatives):
        texts[row] = self._sentence_text(record)
    batch = self.tokenizer.encode(texts, pairs)
    matched = self.design.matched_label
    batch['match_label'] = np.where(mismatched, 1 - matched, matched).astype(np.int32)
    batch.update(region_batch(self.design, self.images, image_index))
    if self.num_answers is not None:
      batch.update(self._qa_targets(records, mismatched))
    return batch

  def _partner_captions(self, anchor: np.ndarray, anchor_image: np.ndarray,
                        epoch: np.ndarray) -> list[str]:
    u = hashed_uniform(self.seed, epoch, anchor, _PARTNER)
    partner = self.caption_groups.partner(anchor, anchor_image, u)
    return [self._sentence_text(r) for r in self.read_sentences(partner)]

  def _qa_targets(self, records: list[dict[str, Any]], mismatched: np.ndarray
                  ) -> dict[str, np.ndarray]:
    scores = np.zeros((len(records), self.num_answers), np.float32)
    is_question = np.zeros((len(records),), bool)
    for row, record in enumerate(records):
      if 'answer_labels' in record:
        is_question[row] = True
        scores[row, record['answer_labels']] = record['answer_scores']
    valid = is_question & ~mismatched
    scores *= valid[:, None]
    return dict(answer_scores=scores, qa_valid=valid.astype(np.float32))


# ----------------------------------------------------------------------------
# Iterator.


def batch_sharding(mesh: Mesh, data_axes: Sequence[str], global_batch_size: int
                   ) -> NamedSharding:
  """Sharding of a batch: axis 0 over the mesh's `data_axes` (those it has)."""
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f'mesh axes {mesh.axis_names} include none of data_axes {tuple(data_axes)}')
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if global_batch_size % shards:
    raise ValueError(f'global_batch_size {global_batch_size} does not divide over the '
                     f'{shards} devices of mesh axes {axes}')
  return NamedSharding(mesh, PartitionSpec(axes))


class PretrainingIterator(grain.DatasetIterator):
  """Endless batches (dicts of arrays); global `jax.Array`s when given a sharding.

  `get_state()` is JSON-serialisable (grain's iterator state plus a fingerprint of
  the pipeline, so a state only restores into an identical pipeline); it also works
  with grain's orbax handler (`grain.checkpoint.CheckpointSave(iterator)`).
  """

  def __init__(self, batches: grain.DatasetIterator, fingerprint: dict[str, Any],
               sharding: NamedSharding | None):
    super().__init__(batches)
    self._fingerprint = json.loads(json.dumps(fingerprint))
    self._sharding = sharding

  def __next__(self) -> dict[str, Any]:
    batch = next(self._parent)
    if self._sharding is None:
      return batch
    return {k: jax.make_array_from_process_local_data(self._sharding, v)
            for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return dict(pipeline=self._fingerprint, grain=self._parent.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('pipeline') != self._fingerprint:
      raise ValueError('iterator state comes from a different pipeline: saved '
                       f'{state.get("pipeline")}, this one {self._fingerprint}')
    self._parent.set_state(state['grain'])


def _all_image_indices(table: Table, chunk: int = 4096) -> np.ndarray:
  logging.info('Reading the image index of every caption in %s (%d records)', table.name,
               len(table))
  return np.array([r['image_index'] for start in range(0, len(table), chunk)
                   for r in table.read(range(start, min(start + chunk, len(table))))],
                  np.int64)


def make_batch_assembler(data_config: ml_collections.ConfigDict, design: design_lib.Design, *,
                         split: str, seed: int, process_count: int = 1) -> BatchAssembler:
  """The tables of `split` and the design's pairing, as a `BatchAssembler`.

  `assembler(0, indices)` gives the pairs of sentences `indices` drawn as in
  epoch 0: deterministic, e.g. for a validation loss.
  """
  tokenizer = BertTokenizer(vocab_file(data_config), data_config.max_text_len,
                            lowercase=data_config.lowercase)
  images = ImageTable(_open(data_config, 'images', data_config.images_split),
                      data_config.max_regions, name=table_name(data_config, 'images'),
                      with_class_probs=design.needs_class_probs,
                      cache=data_config.cache_images,
                      cache_max_gib=data_config.cache_images_max_gib,
                      widen_features=data_config.widen_features,
                      shared_memory=data_config.worker_count > 0)
  sentences = [Table(_open(data_config, 'captions', split), ('text', 'image_index'),
                     name=table_name(data_config, 'captions'))]
  check_same_images(data_config, 'captions', split)
  num_answers = None
  if data_config.qa:
    sentences.append(Table(_open(data_config, 'vqa', split),
                           ('question', 'image_index', 'answer_labels', 'answer_scores'),
                           name=table_name(data_config, 'vqa')))
    check_same_images(data_config, 'vqa', split)
    num_answers = len(answer_vocab(data_config))
  caption_groups = None
  if design.pairing == design_lib.SECOND_CAPTION:
    caption_groups = CaptionGroups.from_image_index(_all_image_indices(sentences[0]),
                                                    images.num_images)
  num_sentences = sum(len(s) for s in sentences)
  shard_size = num_sentences // process_count
  if shard_size == 0:
    raise ValueError(f'{num_sentences} sentences cannot be shared by {process_count} processes')
  return BatchAssembler(
      design=design, tokenizer=tokenizer, images=images, sentences=sentences,
      shard_size=shard_size, seed=seed, mismatch_prob=data_config.mismatch_prob,
      num_answers=num_answers, caption_groups=caption_groups)


def make_pretraining_iterator(data_config: ml_collections.ConfigDict, model_name: str, *,
                              global_batch_size: int, seed: int, mesh: Mesh | None = None,
                              data_axes: Sequence[str] = ('data', 'fsdp'),
                              split: str = 'train') -> PretrainingIterator:
  """Endless, resumable pretraining batches for design `model_name`.

  Args:
    data_config: see `default_data_config()`.
    model_name: one of DESIGNS; sets the mismatch convention and region inputs.
    global_batch_size: examples per step over all processes.
    seed: run seed; `data.seed` overrides it for the data order when set.
    mesh: if given, batches are global `jax.Array`s sharded over `data_axes`.
    split: text split ('train', 'validation', 'test').

  Returns:
    An iterator of dicts (see the data contract): input_ids, text_mask,
    token_type_ids int32 [B, T]; region_feats [B, R, F] (the table's float16;
    float32 with `data.widen_features`); region_loc float32 [B, R, L];
    region_mask int32 [B, R]; object_ids, attr_ids int32 [B, R]; object_conf,
    attr_conf float32 [B, R]; class_probs [B, R, C] (ViLBERT, UNITER; dtype as
    region_feats); match_label int32 [B]; answer_scores float32 [B, A] and
    qa_valid float32 [B] when `data.qa`.
  """
  design = design_lib.get_design(model_name)
  if data_config.qa and not design.recipe.image_qa:
    raise ValueError(f'data.qa=True is image-QA pretraining (LXMERT\'s); {model_name} '
                     'has no QA objective')
  if not 0.0 <= data_config.mismatch_prob <= 1.0:
    raise ValueError(f'data.mismatch_prob must be in [0, 1], got {data_config.mismatch_prob}')
  process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be a positive multiple '
                     f'of the process count {process_count}')
  local_batch_size = global_batch_size // process_count
  sharding = None
  if mesh is not None:
    sharding = batch_sharding(mesh, data_axes, global_batch_size)
  seed = seed if data_config.seed is None else data_config.seed
  if not 0 <= seed < 2**32:
    raise ValueError(f'data seed must be in [0, 2**32), got {seed}')

  assembler = make_batch_assembler(data_config, design, split=split, seed=seed,
                                   process_count=process_count)
  num_sentences, shard_size, images = (assembler.num_sentences, assembler.shard_size,
                                       assembler.images)
  sentences = assembler.sentences

  # Each process takes a contiguous equal shard (the remainder is left out of every
  # epoch), shuffled afresh each epoch.
  dataset = grain.MapDataset.range(num_sentences)
  dataset = dataset[process_index * shard_size:(process_index + 1) * shard_size]
  dataset = dataset.shuffle(seed=seed).repeat()
  dataset = dataset.batch(local_batch_size, drop_remainder=True).map_with_index(assembler)
  if data_config.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside an absl app use defaults.
      flags.FLAGS.mark_as_parsed()
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.worker_count,
                                     per_worker_buffer_size=data_config.worker_buffer_size))
  else:
    stream = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=min(1, data_config.prefetch_batches),
        prefetch_buffer_size=data_config.prefetch_batches))
  fingerprint = dict(
      design=model_name, seed=seed, global_batch_size=global_batch_size,
      process_count=process_count, split=split, num_sentences=num_sentences,
      num_images=images.num_images, tables=[table_name(data_config, t) for t in
                                            ('images', 'captions', 'vqa')[:1 + len(sentences)]],
      max_text_len=data_config.max_text_len, max_regions=data_config.max_regions,
      mismatch_prob=data_config.mismatch_prob, worker_count=data_config.worker_count)
  # cache_images and widen_features change no value in the batches (widening is
  # exact), so they are not part of the fingerprint.
  return PretrainingIterator(iter(stream), fingerprint, sharding)
