"""Readers and validators for the region-feature files researchers already have.

Each reader turns one source into `ImageRecord`s, the per-image row of an images
table (shared MODELS.md, "Region-feature file formats"):

  * `LxmertTsvReader`: LXMERT's `*_obj36.tsv` (10 tab-separated fields, arrays as
    base64 of raw bytes). Read line by line in binary, never the whole file, so
    fields of any size work (no `csv` field-size limit applies).
  * `UniterLmdbReader`: UNITER's `feat_th*` LMDB (values are `.npz` archives,
    compressed or not, or msgpack-numpy dicts; fp16) plus its `nbb_th*.json`
    box counts, which are checked against the LMDB.
  * `NpyFolderReader`: per-image files (VisualBERT/Pythia style): `<id>.npz`, or
    `<id>.npy` features plus a pickled `<id>_info.npy` dict.
  * `VilbertLmdbReader`: ViLBERT's LMDB of pickled dicts. Unpickling runs code
    stored in the file, so it is refused unless `trust_pickle=True`.
  * `ButdHdf5Reader`: the bottom-up-attention VQA code's `*.hdf5` (fixed 36
    boxes, or its adaptive layout with `pos_boxes`) and its image-id index.

Readers work in two steps, so that a builder can validate everything first and
then write in index order: `iter_raw()` streams `(key, raw)` pairs cheaply, and
`decode(key, raw)` parses and validates one record (raising `FormatError` naming
the file and line, LMDB key or image id); `fetch(key)` re-reads a raw record.

Conventions of the stored record (the data contract): boxes are x1, y1, x2, y2 in
pixels of an image of size (image_h, image_w); object ids count the detector's
1600 Visual Genome classes from 0 (background excluded, as in LXMERT's TSVs);
`class_probs` keeps the detector's full distribution with class 0 = background.
A source with no attribute (or object) predictions stores ids 0 with confidence
0, so confidence-weighted losses give those labels no weight. UNITER stores only
normalised boxes; given image sizes they become pixels, otherwise the record has
image_h = image_w = 1 and normalised boxes, which every model's box features
(coordinates divided by the image size) read the same way.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import collections
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from vlpjax import paths

ON_ERROR_CHOICES = ('raise', 'skip')
LXMERT_TSV_FIELDS = ('img_id', 'img_h', 'img_w', 'objects_id', 'objects_conf',
                     'attrs_id', 'attrs_conf', 'num_boxes', 'boxes', 'features')
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Boxes may overshoot the image by this fraction of its larger side (rounding in
# the detectors' clipping); anything further out is malformed.
BOX_TOLERANCE = 1e-3


class FormatError(ValueError):
  """A malformed record; `where` names the file and line, LMDB key or image id.

  `kind` is the short class of the problem ('truncated row', 'non-finite
  features', 'box outside image'), free of ids, which the ingest report counts
  records by; `reason` is the full message.
  """

  def __init__(self, where: str, reason: str, *, kind: str):
    super().__init__(f'{where}: {reason}')
    self.where = where
    self.reason = reason
    self.kind = kind


class PickleRefusedError(ValueError):
  """A source holds pickled Python objects and the caller did not trust it."""


class PlainUnpickler(pickle.Unpickler):
  """Loads lists, dicts, tuples, strings and numbers only: any class or
  function a pickle names (the way a pickle runs code) is a `FormatError`, so
  plain-data pickles (RefCOCO's refs, BUTD's image-id index) are safe to read."""

  def __init__(self, file: Any, path: str):
    # Python 2 pickles (the originals' cPickle files): byte strings are UTF-8 text.
    super().__init__(file, encoding='utf-8')
    self.path = path

  def find_class(self, module: str, name: str) -> Any:
    raise FormatError(self.path, f'the pickle asks for {module}.{name}; only plain data '
                      '(lists, dicts, strings, numbers) is read', kind='pickled class')


try:
  from numpy._core import multiarray as _multiarray, numeric as _numeric  # numpy >= 2
except ImportError:  # pragma: no cover (numpy 1)
  from numpy.core import multiarray as _multiarray, numeric as _numeric
# What a pickle of numpy arrays names (protocol 5: `_frombuffer`), under numpy
# 1's and numpy 2's module paths.
_ARRAY_CLASSES = {(f'{package}.{module}', name): value
                  for package in ('numpy.core', 'numpy._core')
                  for module, name, value in (
                      ('multiarray', '_reconstruct', _multiarray._reconstruct),
                      ('multiarray', 'scalar', _multiarray.scalar),
                      ('numeric', '_frombuffer', _numeric._frombuffer))}
_ARRAY_CLASSES.update({('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
                       # How Python 3 writes bytes in pickle protocol 2: text -> bytes.
                       ('_codecs', 'encode'): codecs.encode})


class ArrayUnpickler(PlainUnpickler):
  """`PlainUnpickler` that also admits numpy arrays of plain dtypes (what
  detectron2's `.pkl` weight files hold): the array constructors are the only
  names a pickle may ask for, and an array of Python objects is refused, so
  loading runs no code from the file. Byte strings decode as latin-1, as
  detectron2 reads Python 2 pickles (an array's raw data must stay bytes)."""

  def __init__(self, file: Any, path: str):
    pickle.Unpickler.__init__(self, file, encoding='latin1')  # pylint: disable=non-parent-init-called
    self.path = path

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ARRAY_CLASSES:
      return _ARRAY_CLASSES[(module, name)]
    raise FormatError(self.path, f'the pickle asks for {module}.{name}; only plain data and '
                      'numpy arrays are read', kind='pickled class')

  def load(self) -> Any:
    loaded = super().load()
    _check_no_object_arrays(loaded, self.path)
    return loaded


def _check_no_object_arrays(value: Any, path: str) -> None:
  if isinstance(value, np.ndarray) and value.dtype.hasobject:
    raise FormatError(path, 'the pickle holds an array of Python objects; only arrays of '
                      'numbers are read', kind='pickled class')
  if isinstance(value, Mapping):
    value = list(value.values())
  if isinstance(value, (list, tuple)):
    for item in value:
      _check_no_object_arrays(item, path)


def pickle_refusal(what: str) -> PickleRefusedError:
  return PickleRefusedError(
      f'{what} holds Python pickles. Unpickling runs whatever code the file '
      'contains, so vlpjax refuses it by default. If the file comes from a source '
      'you trust (e.g. you extracted the features yourself), pass '
      'trust_pickle=True.')


class ErrorReport:
  """Malformed records met while reading: raised, or skipped and counted.

  Builders write it as JSON (`to_dict`) next to the dataset in either mode, also
  when the build fails: with on_error='skip' it keeps every skipped record (where
  and why) and counts them by kind (`by_reason`); with 'raise' it names the
  record that stopped the build (`error`). Nothing is dropped silently.
  """

  def __init__(self, on_error: str, source: str):
    if on_error not in ON_ERROR_CHOICES:
      raise ValueError(f'on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}')
    self.on_error = on_error
    self.source = source
    self.skipped: list[dict[str, str]] = []
    self.error: dict[str, str] | None = None

  def handle(self, error: FormatError) -> None:
    """Raises `error` (on_error='raise') or records it as skipped."""
    entry = {'where': error.where, 'kind': error.kind, 'reason': error.reason}
    if self.on_error == 'raise':
      self.error = entry
      raise error
    self.skipped.append(entry)

  def skip(self, error: FormatError) -> None:
    """Records `error` as skipped in either mode: for records their own format
    marks as unusable (SNLI's gold_label '-': the annotators did not agree)."""
    self.skipped.append({'where': error.where, 'kind': error.kind, 'reason': error.reason})

  def to_dict(self) -> dict[str, Any]:
    reasons = collections.Counter(s['kind'] for s in self.skipped)
    return {'source': self.source, 'on_error': self.on_error,
            'num_skipped': len(self.skipped), 'by_reason': dict(reasons),
            'error': self.error, 'skipped': self.skipped}

  def log(self) -> None:
    if self.skipped:
      logging.warning('%s: skipped %d malformed records (%s); see the JSON report.',
                      self.source, len(self.skipped), self.to_dict()['by_reason'])

  def write(self, path: str | os.PathLike[str]) -> None:
    paths.path(path).write_text(json.dumps(self.to_dict(), indent=1))


@dataclasses.dataclass
class ImageRecord:
  """One image's regions, in the stored dtypes. N regions, F features, C classes.

  boxes [N, 4] float32 pixels x1,y1,x2,y2; features [N, F] float16;
  object_ids, attr_ids [N] int32; object_conf, attr_conf [N] float32;
  class_probs [N, C] float16 or None when the source has no class distribution.
  """
  image_id: str
  image_h: int
  image_w: int
  boxes: np.ndarray
  features: np.ndarray
  object_ids: np.ndarray
  object_conf: np.ndarray
  attr_ids: np.ndarray
  attr_conf: np.ndarray
  class_probs: np.ndarray | None = None

  @property
  def num_boxes(self) -> int:
    return int(self.boxes.shape[0])

  def as_example(self, index: int) -> dict[str, Any]:
    """The images-table example (data contract) for row `index`."""
    example = dict(index=index, image_id=self.image_id, image_h=self.image_h,
                   image_w=self.image_w, num_boxes=self.num_boxes, boxes=self.boxes,
                   features=self.features, object_ids=self.object_ids,
                   object_conf=self.object_conf, attr_ids=self.attr_ids,
                   attr_conf=self.attr_conf)
    if self.class_probs is not None:
      example['class_probs'] = self.class_probs
    return example


def make_record(where: str, *, image_id: str, image_h: Any, image_w: Any,
                boxes: np.ndarray, features: np.ndarray, feature_dim: int,
                num_classes: int | None, object_ids: np.ndarray | None = None,
                object_conf: np.ndarray | None = None, attr_ids: np.ndarray | None = None,
                attr_conf: np.ndarray | None = None,
                class_probs: np.ndarray | None = None) -> ImageRecord:
  """Checks one image's arrays and converts them to the stored dtypes.

  Missing object/attribute predictions become id 0 with confidence 0. With
  `num_classes` set, `class_probs` [N, num_classes] is required; object ids and
  confidences missing from the source are then taken from it (argmax over the
  non-background classes). Raises `FormatError` naming `where` on: no regions,
  inconsistent shapes, a feature size other than `feature_dim`, non-finite
  values (also features beyond float16's range), an image size <= 0, or boxes
  that are inverted or lie outside the image.
  """
  if not str(image_id) or '\n' in str(image_id):
    raise FormatError(where, f'image_id: empty or multi-line id {str(image_id)!r}',
                      kind='bad image id')
  image_h = _positive_int(where, 'image_h', image_h)
  image_w = _positive_int(where, 'image_w', image_w)
  boxes = np.asarray(boxes, np.float32)
  features = np.asarray(features)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise FormatError(where, f'boxes: expected shape [N, 4], got {boxes.shape}',
                      kind='wrong boxes shape')
  num_boxes = boxes.shape[0]
  if num_boxes == 0:
    raise FormatError(where, 'no regions: the image has 0 boxes', kind='no regions')
  if features.shape != (num_boxes, feature_dim):
    raise FormatError(where, f'features: expected shape [{num_boxes}, {feature_dim}] '
                      f'(num boxes, feature_dim), got {features.shape}',
                      kind='wrong features shape')
  _check_finite(where, 'features', features)
  if np.abs(features).max() > FLOAT16_MAX:
    raise FormatError(where, f'features: values up to {np.abs(features).max():.3g} '
                      'overflow float16', kind='features overflow float16')
  _check_finite(where, 'boxes', boxes)
  _check_boxes(where, boxes, image_h, image_w)

  if class_probs is not None:
    class_probs = np.asarray(class_probs, np.float32)
    if num_classes is None:
      raise FormatError(where, 'class_probs: the source has a class distribution but '
                        'the builder config sets num_classes=None', kind='unexpected class_probs')
    if class_probs.shape != (num_boxes, num_classes):
      raise FormatError(where, f'class_probs: expected shape [{num_boxes}, {num_classes}], '
                        f'got {class_probs.shape}', kind='wrong class_probs shape')
    _check_finite(where, 'class_probs', class_probs)
    if object_ids is None:
      object_ids = class_probs[:, 1:].argmax(axis=-1)
    if object_conf is None:
      object_conf = class_probs[:, 1:].max(axis=-1)
  elif num_classes is not None:
    raise FormatError(where, f'class_probs: missing, but the builder config expects '
                      f'num_classes={num_classes}', kind='missing class_probs')

  def per_box(name: str, values: np.ndarray | None, dtype: Any) -> np.ndarray:
    if values is None:
      return np.zeros([num_boxes], dtype)
    values = np.asarray(values)
    if values.shape != (num_boxes,):
      raise FormatError(where, f'{name}: expected shape [{num_boxes}], got {values.shape}',
                        kind=f'wrong {name} shape')
    _check_finite(where, name, values)
    limit = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else None
    if limit is not None and (values.min() < 0 or values.max() > limit):
      raise FormatError(where, f'{name}: ids out of range [0, {limit}]',
                        kind=f'{name} out of range')
    return values.astype(dtype)

  return ImageRecord(
      image_id=str(image_id), image_h=image_h, image_w=image_w, boxes=boxes,
      features=features.astype(np.float16),
      object_ids=per_box('object_ids', object_ids, np.int32),
      object_conf=per_box('object_conf', object_conf, np.float32),
      attr_ids=per_box('attr_ids', attr_ids, np.int32),
      attr_conf=per_box('attr_conf', attr_conf, np.float32),
      class_probs=None if class_probs is None else class_probs.astype(np.float16))


def _positive_int(where: str, name: str, value: Any) -> int:
  try:
    number = float(np.asarray(value).reshape(()))
  except (TypeError, ValueError) as e:
    raise FormatError(where, f'{name}: not a number ({value!r})', kind=f'bad {name}') from e
  if not np.isfinite(number) or number <= 0 or number != int(number):
    raise FormatError(where, f'{name}: expected a positive integer, got {value!r}',
                      kind=f'bad {name}')
  return int(number)


def _check_finite(where: str, name: str, values: np.ndarray) -> None:
  if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
    bad = np.argwhere(~np.isfinite(values))[0].tolist()
    raise FormatError(where, f'{name}: non-finite value (NaN/inf) at {bad}',
                      kind=f'non-finite {name}')


def _check_boxes(where: str, boxes: np.ndarray, image_h: int, image_w: int) -> None:
  x1, y1, x2, y2 = boxes.T
  if ((x2 < x1) | (y2 < y1)).any():
    row = int(np.argmax((x2 < x1) | (y2 < y1)))
    raise FormatError(where, f'boxes: box {row} {boxes[row].tolist()} has x2 < x1 or y2 < y1',
                      kind='inverted box')
  slack = BOX_TOLERANCE * max(image_h, image_w)
  outside = (x1 < -slack) | (y1 < -slack) | (x2 > image_w + slack) | (y2 > image_h + slack)
  if outside.any():
    row = int(np.argmax(outside))
    raise FormatError(where, f'boxes: box {row} {boxes[row].tolist()} lies outside the '
                      f'{image_w}x{image_h} (w x h) image', kind='box outside image')


def decode_base64_array(where: str, field: str, text: bytes | str, dtype: Any,
                        shape: tuple[int, ...]) -> np.ndarray:
  """base64 of raw bytes -> array of `shape`; a wrong length is a `FormatError`."""
  try:
    raw = base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    raise FormatError(where, f'{field}: invalid base64 ({e})', kind='invalid base64') from e
  expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
  if len(raw) != expected:
    raise FormatError(where, f'{field}: base64 decodes to {len(raw)} bytes, expected '
                      f'{expected} ({np.dtype(dtype).name} of shape {list(shape)})',
                      kind=f'wrong {field} length')
  return np.frombuffer(raw, dtype=dtype).reshape(shape)


class LxmertTsvReader:
  """LXMERT's region-feature TSV: one image per line, no header.

  Fields: img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf,
  num_boxes, boxes, features; arrays are base64 of raw bytes: ids int64 [N],
  confidences float32 [N], boxes float32 [N, 4] pixels, features float32 [N, F].
  Keys are (line number, byte offset) so that `fetch` can seek back to a line.
  """

  def __init__(self, path: str | os.PathLike[str], feature_dim: int = 2048):
    self.path = os.fspath(path)
    self.feature_dim = feature_dim
    self.num_classes = None

  def iter_raw(self) -> Iterator[tuple[tuple[int, int], bytes]]:
    with paths.path(self.path).open('rb') as f:
      line_number = 0
      while True:
        offset = f.tell()
        line = f.readline()
        if not line:
          return
        line_number += 1
        if line.strip():
          yield (line_number, offset), line

  def describe(self, key: tuple[int, int]) -> str:
    return f'{self.path}:{key[0]}'

  def fetch(self, key: tuple[int, int]) -> bytes:
    with paths.path(self.path).open('rb') as f:
      f.seek(key[1])
      return f.readline()

  def decode(self, key: tuple[int, int], raw: bytes) -> ImageRecord:
    where = self.describe(key)
    fields = raw.rstrip(b'\r\n').split(b'\t')
    if len(fields) != len(LXMERT_TSV_FIELDS):
      raise FormatError(where, f'truncated or malformed row: expected '
                        f'{len(LXMERT_TSV_FIELDS)} tab-separated fields '
                        f'({", ".join(LXMERT_TSV_FIELDS)}), got {len(fields)}',
                        kind='truncated row')
    row = dict(zip(LXMERT_TSV_FIELDS, fields))
    image_id = row['img_id'].decode('utf-8', errors='replace')
    where = f'{where} (image {image_id})'
    n = _positive_int(where, 'num_boxes', row['num_boxes'].decode())
    array = lambda field, dtype, shape: decode_base64_array(where, field, row[field], dtype, shape)
    return make_record(
        where, image_id=image_id, image_h=row['img_h'].decode(), image_w=row['img_w'].decode(),
        boxes=array('boxes', np.float32, (n, 4)),
        features=array('features', np.float32, (n, self.feature_dim)),
        feature_dim=self.feature_dim, num_classes=None,
        object_ids=array('objects_id', np.int64, (n,)),
        object_conf=array('objects_conf', np.float32, (n,)),
        attr_ids=array('attrs_id', np.int64, (n,)),
        attr_conf=array('attrs_conf', np.float32, (n,)))


def load_numpy_dict(raw: bytes, where: str) -> Mapping[str, np.ndarray]:
  """An `.npz` archive (compressed or not) or a msgpack-numpy dict -> arrays.

  Neither path unpickles: `.npz` is read with allow_pickle=False, and msgpack's
  numpy arrays are rebuilt from their dtype, shape and raw bytes.
  """
  if raw[:4] == b'PK\x03\x04':
    try:
      with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
    except (ValueError, zipfile.BadZipFile, OSError) as e:
      raise FormatError(where, f'unreadable .npz value ({e})', kind='unreadable value') from e
  try:
    import msgpack  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FormatError(where, 'value is not an .npz archive; reading msgpack values '
                      'needs `pip install msgpack`', kind='msgpack not installed') from e
  try:
    value = msgpack.unpackb(raw, raw=False, object_hook=_msgpack_numpy_array)
  except (ValueError, msgpack.UnpackException, TypeError) as e:
    raise FormatError(where, f'value is neither an .npz archive nor msgpack ({e})',
                      kind='unreadable value') from e
  if not isinstance(value, dict):
    raise FormatError(where, f'expected a dict of arrays, got {type(value).__name__}',
                      kind='not a dict')
  return value


def _msgpack_numpy_array(obj: dict[str, Any]) -> Any:
  """msgpack-numpy's array encoding {nd, type, shape, data} -> np.ndarray."""
  if obj.get('nd') is True:
    return np.frombuffer(obj['data'], dtype=np.dtype(obj['type'])).reshape(obj['shape'])
  return obj


def _required(where: str, arrays: Mapping[str, Any], names: Sequence[str]) -> Any:
  """The first of `names` present in `arrays` (files name the same field differently)."""
  for name in names:
    if name in arrays:
      return arrays[name]
  raise FormatError(where, f'missing field: none of {list(names)} (has {sorted(arrays)})',
                    kind='missing field')


def _optional(arrays: Mapping[str, Any], names: Sequence[str]) -> Any:
  return next((arrays[name] for name in names if name in arrays), None)


def image_key(image_id: Any, match: str) -> str | int:
  """The key two sources' image ids are matched by.

  'exact': the id as text. 'number': the trailing number of the id without a file
  extension, so 'COCO_val2014_000000391895', 'coco_val2014_000000391895.jpg' and
  391895 all match (COCO ids are unique across its splits).
  """
  if match == 'exact':
    return str(image_id)
  if match == 'number':
    if isinstance(image_id, (int, np.integer)):
      return int(image_id)
    found = re.search(r'(\d+)$', os.path.splitext(str(image_id))[0])
    if not found:
      raise ValueError(f'image id {image_id!r} does not end in a number; '
                       "use match='exact'")
    return int(found.group(1))
  raise ValueError(f"match must be 'exact' or 'number', got {match!r}")


def load_image_sizes(path: str | os.PathLike[str], match: str) -> dict[str | int, tuple[int, int]]:
  """Image sizes (h, w) from a COCO-style JSON (`images`: id, file_name, width,
  height; e.g. `captions_train2014.json`) or a JSON {image_id: [h, w]}."""
  data = json.loads(paths.path(path).read_text())
  sizes = {}
  if isinstance(data, dict) and 'images' in data:
    for image in data['images']:
      sizes[image_key(image['id'] if match == 'number' else
                      os.path.splitext(image['file_name'])[0], match)] = (
                          int(image['height']), int(image['width']))
  elif isinstance(data, dict):
    for image_id, size in data.items():
      if len(size) != 2:
        raise ValueError(f'{path}: image {image_id}: expected [h, w], got {size!r}')
      sizes[image_key(image_id, match)] = (int(size[0]), int(size[1]))
  else:
    raise ValueError(f'{path}: expected a COCO-style JSON with "images" or a dict '
                     '{image_id: [h, w]}')
  return sizes


class _LmdbReader:
  """Shared by the LMDB readers: read-only environment, raw iteration, lookup."""
  path: str
  skip_keys: frozenset[bytes] = frozenset()

  def _open(self) -> None:
    import lmdb  # pylint: disable=g-import-not-at-top
    if not paths.is_local(self.path):
      raise ValueError(f'{self.path}: LMDB reads local files only; copy it to this '
                       'machine (gcloud storage cp -r) and give that path')
    self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False,
                         create=False, subdir=os.path.isdir(self.path))

  def iter_raw(self) -> Iterator[tuple[bytes, bytes]]:
    with self.env.begin() as txn:
      for key, value in txn.cursor():
        if key not in self.skip_keys:
          yield key, bytes(value)

  def describe(self, key: bytes) -> str:
    return f'{self.path}[{key.decode(errors="replace")}]'

  def fetch(self, key: bytes) -> bytes:
    with self.env.begin() as txn:
      return bytes(txn.get(key))


class UniterLmdbReader(_LmdbReader):
  """UNITER's region-feature LMDB plus its box-count JSON.

  Values hold fp16 `features` [N, F], `norm_bb` [N, 6 or 7] (x1, y1, x2, y2, w,
  h[, area], normalised), `conf` [N] and `soft_labels` [N, C]. The JSON
  (`nbb_th*.json`) gives the number of boxes UNITER keeps per image (the first
  nbb rows); its keys must be exactly the LMDB's. With `image_sizes` (see
  `load_image_sizes`) boxes become pixels; without, image_h = image_w = 1.
  """

  def __init__(self, lmdb_path: str | os.PathLike[str], box_counts_path: str | os.PathLike[str],
               feature_dim: int = 2048, num_classes: int | None = 1601,
               image_sizes: Mapping[str | int, tuple[int, int]] | None = None,
               match: str = 'number'):
    self.path = os.fspath(lmdb_path)
    self.feature_dim = feature_dim
    self.num_classes = num_classes
    self.image_sizes = image_sizes
    self.match = match
    self.box_counts = json.loads(paths.path(box_counts_path).read_text())
    self._open()
    with self.env.begin() as txn:
      lmdb_keys = {key.decode() for key, _ in txn.cursor()}
    missing_in_json = sorted(lmdb_keys - self.box_counts.keys())
    missing_in_lmdb = sorted(self.box_counts.keys() - lmdb_keys)
    if missing_in_json or missing_in_lmdb:
      raise ValueError(
          f'{box_counts_path} and {self.path} disagree: {len(missing_in_json)} LMDB keys '
          f'have no box count (e.g. {missing_in_json[:3]}), {len(missing_in_lmdb)} counted '
          f'images are not in the LMDB (e.g. {missing_in_lmdb[:3]})')

  def decode(self, key: bytes, raw: bytes) -> ImageRecord:
    image_id = key.decode()
    where = self.describe(key)
    arrays = load_numpy_dict(raw, where)
    nbb = self.box_counts[image_id]
    norm_bb = np.asarray(_required(where, arrays, ['norm_bb']), np.float32)
    if norm_bb.ndim != 2 or norm_bb.shape[1] not in (6, 7) or norm_bb.shape[0] < nbb:
      raise FormatError(where, f'norm_bb: expected shape [>= {nbb}, 6 or 7] (nbb from the '
                        f'box-count JSON), got {norm_bb.shape}', kind='wrong norm_bb shape')
    if self.image_sizes is None:
      image_h = image_w = 1
    else:
      size = self.image_sizes.get(image_key(image_id, self.match))
      if size is None:
        raise FormatError(where, 'image size: the image is not in image_sizes',
                          kind='unknown image size')
      image_h, image_w = size
    scale = np.array([image_w, image_h, image_w, image_h], np.float32)
    first = lambda name: _first_rows(where, name, _required(where, arrays, [name]), nbb)
    soft_labels = first('soft_labels') if self.num_classes is not None else None
    return make_record(
        where, image_id=image_id, image_h=image_h, image_w=image_w,
        boxes=norm_bb[:nbb, :4] * scale, features=first('features'),
        feature_dim=self.feature_dim, num_classes=self.num_classes,
        object_conf=np.asarray(first('conf'), np.float32), class_probs=soft_labels)


def _first_rows(where: str, name: str, values: np.ndarray, count: int) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim == 0 or values.shape[0] < count:
    raise FormatError(where, f'{name}: expected at least {count} rows, got shape {values.shape}',
                      kind=f'too few {name} rows')
  return values[:count]


class NpyFolderReader:
  """Per-image region files in one folder (VisualBERT/Pythia style).

  Either `<id>.npz` holding plain arrays (features `features`|`x`, boxes
  `boxes`|`bbox` in pixels, `image_h`|`image_height`, `image_w`|`image_width`,
  optional `objects_id`|`objects`, `objects_conf`, `attrs_id`, `attrs_conf`,
  `cls_prob`|`soft_labels`), or Pythia's `<id>.npy` features [N, F] with a
  `<id>_info.npy` dict (`bbox`, `image_height`, `image_width`, ...). Pythia's
  info files and npz files with a pickled `info` field need trust_pickle=True.
  """

  def __init__(self, folder: str | os.PathLike[str], feature_dim: int = 2048,
               num_classes: int | None = None, trust_pickle: bool = False):
    self.path = os.fspath(folder)
    self.feature_dim = feature_dim
    self.num_classes = num_classes
    self.trust_pickle = trust_pickle

  def iter_raw(self) -> Iterator[tuple[str, None]]:
    for name in sorted(entry.name for entry in paths.path(self.path).iterdir()):
      stem, ext = os.path.splitext(name)
      if ext == '.npz' or (ext == '.npy' and not stem.endswith('_info')):
        yield name, None

  def describe(self, key: str) -> str:
    return paths.join(self.path, key)

  def fetch(self, key: str) -> None:
    del key

  def decode(self, key: str, raw: None) -> ImageRecord:
    del raw
    path = self.describe(key)
    stem, ext = os.path.splitext(key)
    try:
      if ext == '.npz':
        arrays = self._read_npz(path)
      else:
        arrays = dict(self._read_info(paths.join(self.path, stem + '_info.npy')))
        with paths.path(path).open('rb') as f:
          arrays['features'] = np.load(f, allow_pickle=False)
    except (FormatError, PickleRefusedError):
      raise
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise FormatError(path, f'unreadable file ({e})', kind='unreadable file') from e
    return make_record(
        f'{path} (image {stem})', image_id=stem,
        image_h=_required(path, arrays, ['image_h', 'image_height']),
        image_w=_required(path, arrays, ['image_w', 'image_width']),
        boxes=_required(path, arrays, ['boxes', 'bbox']),
        features=_required(path, arrays, ['features', 'x', 'feat']),
        feature_dim=self.feature_dim, num_classes=self.num_classes,
        object_ids=_optional(arrays, ['objects_id', 'objects', 'object_ids']),
        object_conf=_optional(arrays, ['objects_conf', 'object_conf']),
        attr_ids=_optional(arrays, ['attrs_id', 'attr_ids']),
        attr_conf=_optional(arrays, ['attrs_conf', 'attr_conf']),
        class_probs=(_optional(arrays, ['cls_prob', 'soft_labels', 'class_probs'])
                     if self.num_classes is not None else None))

  def _read_npz(self, path: str) -> dict[str, Any]:
    with paths.path(path).open('rb') as f, np.load(f, allow_pickle=self.trust_pickle) as archive:
      names = archive.files
      if 'info' in names and not self.trust_pickle:
        raise pickle_refusal(f'{path} (its `info` field)')
      arrays = {name: archive[name] for name in names if name != 'info'}
      if 'info' in names:
        arrays.update(archive['info'].item())
    return arrays

  def _read_info(self, path: str) -> Mapping[str, Any]:
    if not paths.path(path).exists():
      raise FormatError(path, 'missing: Pythia-style features need a <id>_info.npy '
                        'beside <id>.npy', kind='missing info file')
    if not self.trust_pickle:
      raise pickle_refusal(path)
    with paths.path(path).open('rb') as f:
      info = np.load(f, allow_pickle=True).item()
    if not isinstance(info, dict):
      raise FormatError(path, f'expected a dict, got {type(info).__name__}', kind='not a dict')
    return info


class VilbertLmdbReader(_LmdbReader):
  """ViLBERT's LMDB: values are pickled dicts (image_id, image_h, image_w,
  num_boxes, boxes, features[, cls_prob]); arrays are float32, raw or as base64.

  Pickle runs code stored in the file when loaded, so this reader refuses to
  open the LMDB unless `trust_pickle=True`.
  """
  skip_keys = frozenset({b'keys'})  # ViLBERT's pickled list of all keys

  def __init__(self, lmdb_path: str | os.PathLike[str], feature_dim: int = 2048,
               num_classes: int | None = None, trust_pickle: bool = False):
    self.path = os.fspath(lmdb_path)
    if not trust_pickle:
      raise pickle_refusal(f'ViLBERT LMDB {self.path}')
    self.feature_dim = feature_dim
    self.num_classes = num_classes
    self._open()

  def decode(self, key: bytes, raw: bytes) -> ImageRecord:
    where = self.describe(key)
    try:
      item = pickle.loads(raw)  # trusted by the caller, see __init__
    except Exception as e:  # pylint: disable=broad-except
      raise FormatError(where, f'unreadable pickle ({type(e).__name__}: {e})',
                        kind='unreadable pickle') from e
    if not isinstance(item, dict):
      raise FormatError(where, f'expected a dict, got {type(item).__name__}', kind='not a dict')
    n = _positive_int(where, 'num_boxes', _required(where, item, ['num_boxes']))

    def array(names: Sequence[str], shape: tuple[int, ...], required: bool = True) -> Any:
      value = _required(where, item, names) if required else _optional(item, names)
      if isinstance(value, (bytes, str)):
        return decode_base64_array(where, names[0], value, np.float32, shape)
      return value

    return make_record(
        where, image_id=_decode_text(_required(where, item, ['image_id'])),
        image_h=_required(where, item, ['image_h', 'image_height']),
        image_w=_required(where, item, ['image_w', 'image_width']),
        boxes=array(['boxes', 'bbox'], (n, 4)),
        features=array(['features'], (n, self.feature_dim)),
        feature_dim=self.feature_dim, num_classes=self.num_classes,
        object_ids=_optional(item, ['objects', 'objects_id']),
        class_probs=(array(['cls_prob'], (n, self.num_classes))
                     if self.num_classes is not None else None))


# The image-id index the BUTD converter writes beside `<stem>.hdf5`.
BUTD_INDEX_SUFFIXES = ('_imgid2idx.pkl', '_imgid2idx.json')
# Datasets some exporters put in the file itself instead of the index.
BUTD_ID_DATASETS = ('image_ids', 'image_id')
# An image side recovered from a box (x2 / (x2 / w)) within this many pixels of the others'.
BUTD_SIZE_TOLERANCE = 1.0


class ButdHdf5Reader:
  """The bottom-up-attention VQA code's HDF5 (hengyuan-hu/bottom-up-attention-vqa
  `tools/detection_features_converter.py` and its adaptive 10-100-box variant).

  Datasets, I images of N boxes: `image_features` [I, N, F], `image_bb` [I, N, 4]
  (pixels x1, y1, x2, y2), `spatial_features` [I, N, 6] (x1/w, y1/h, x2/w, y2/h,
  box w/w, box h/h); the adaptive layout stores them flat ([sum of N, ...]) with
  `pos_boxes` [I, 2], the first and end row of each image.
  Which image a row is: an `image_ids` (or `image_id`) dataset [I] in the file,
  else the converter's index beside it, `<stem>_imgid2idx.pkl` ({image_id: row},
  a Python 2 pickle of plain data, read with `PlainUnpickler`: nothing in it can
  run) or the same dict as `<stem>_imgid2idx.json`. Rows no id points to are
  logged, not read. Image sizes come from `image_sizes` ({image key: (h, w)},
  see `image_key`) when given, else from the boxes: x2 / (x2 / w), which every
  box of the image must agree on.
  """

  def __init__(self, path: str | os.PathLike[str], feature_dim: int = 2048,
               image_sizes: Mapping[str | int, tuple[int, int]] | None = None,
               match: str = 'number'):
    import h5py  # pylint: disable=g-import-not-at-top
    self.path = os.fspath(path)
    self.feature_dim = feature_dim
    self.num_classes = None
    self.image_sizes = image_sizes
    self.match = match
    # h5py reads a file object as well, so gs:// goes through the same path type.
    self.file = h5py.File(paths.path(self.path).open('rb'), 'r')
    missing = [name for name in ('image_features', 'image_bb') if name not in self.file]
    if missing:
      raise FormatError(self.path, f'missing datasets {missing}; a BUTD HDF5 holds '
                        'image_features, image_bb and spatial_features',
                        kind='missing datasets')
    self.adaptive = 'pos_boxes' in self.file
    if self.adaptive:
      self.spans = np.asarray(self.file['pos_boxes'], np.int64)
      num_images = len(self.spans)
    else:
      num_images = self.file['image_features'].shape[0]
    self.rows = self._read_index(num_images)
    unread = num_images - len(set(self.rows.values()))
    if unread:
      logging.warning('%s: %d of %d rows have no image id in the index and are not read',
                      self.path, unread, num_images)

  def _read_index(self, num_images: int) -> dict[str, int]:
    """{image id: row}, in row order."""
    for name in BUTD_ID_DATASETS:
      if name in self.file:
        ids = [_decode_text(i) for i in np.asarray(self.file[name]).reshape(-1)]
        if len(ids) != num_images:
          raise FormatError(f'{self.path}[{name}]', f'{len(ids)} ids for {num_images} images',
                            kind='index size')
        index, where = dict(zip(ids, range(num_images))), f'{self.path}[{name}]'
        if len(index) != len(ids):
          raise FormatError(where, 'an image id appears twice', kind='duplicate image id')
        return index
    stem = os.path.splitext(self.path)[0]
    for suffix in BUTD_INDEX_SUFFIXES:
      where = stem + suffix
      if paths.path(where).exists():
        break
    else:
      raise FileNotFoundError(
          f'{self.path}: no image-id index: neither an {"/".join(BUTD_ID_DATASETS)} dataset in '
          f'the file nor {" or ".join(stem + s for s in BUTD_INDEX_SUFFIXES)}')
    with paths.path(where).open('rb') as f:
      try:
        index = json.load(f) if where.endswith('.json') else PlainUnpickler(f, where).load()
      except FormatError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise FormatError(where, f'unreadable index ({type(e).__name__}: {e})',
                          kind='unreadable index') from e
    if not isinstance(index, dict):
      raise FormatError(where, f'expected a dict {{image_id: row}}, got {type(index).__name__}',
                        kind='bad index')
    rows: dict[str, int] = {}
    for image_id, row in index.items():
      if not isinstance(row, (int, np.integer)) or not 0 <= row < num_images:
        raise FormatError(f'{where} (image {image_id})', f'row {row!r} is not in [0, '
                          f'{num_images}) of {self.path}', kind='index row out of range')
      rows[_decode_text(image_id)] = int(row)
    if len(set(rows.values())) != len(rows):
      raise FormatError(where, 'two image ids point to the same row', kind='duplicate row')
    return dict(sorted(rows.items(), key=lambda item: item[1]))

  def iter_raw(self) -> Iterator[tuple[str, int]]:
    yield from self.rows.items()

  def describe(self, key: str) -> str:
    return f'{self.path}[row {self.rows[key]}] (image {key})'

  def fetch(self, key: str) -> int:
    return self.rows[key]

  def _arrays(self, name: str, row: int) -> np.ndarray:
    if self.adaptive:
      first, end = self.spans[row]
      return np.asarray(self.file[name][first:end])
    return np.asarray(self.file[name][row])

  def _image_size(self, where: str, image_id: str, boxes: np.ndarray, row: int
                  ) -> tuple[int, int]:
    """(h, w): from `image_sizes`, else recovered from `spatial_features`."""
    if self.image_sizes is not None:
      key = image_key(image_id, self.match)
      if key not in self.image_sizes:
        raise FormatError(where, f'no size for image key {key!r} in image_sizes',
                          kind='missing image size')
      return self.image_sizes[key]
    if 'spatial_features' not in self.file:
      raise FormatError(self.path, 'no spatial_features to recover image sizes from; give '
                        'image_sizes', kind='missing image size')
    spatial = self._arrays('spatial_features', row).astype(np.float64)
    sides = []
    for pixels, fraction, name in ((boxes[:, 3], spatial[:, 3], 'h'),
                                   (boxes[:, 2], spatial[:, 2], 'w')):
      usable = fraction > 1e-3
      if not usable.any():
        raise FormatError(where, f'image {name}: no box to recover it from', kind='bad image size')
      estimates = pixels[usable] / fraction[usable]
      side = float(np.median(estimates))
      if np.abs(estimates - side).max() > BUTD_SIZE_TOLERANCE:
        raise FormatError(where, f'spatial_features disagree with image_bb on the image {name} '
                          f'({estimates.min():.1f} to {estimates.max():.1f} px)',
                          kind='inconsistent spatial_features')
      sides.append(int(round(side)))
    return sides[0], sides[1]

  def decode(self, key: str, raw: int) -> ImageRecord:
    where = self.describe(key)
    boxes = self._arrays('image_bb', raw).astype(np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
      raise FormatError(where, f'image_bb: expected shape [N, 4], got {boxes.shape}',
                        kind='wrong boxes shape')
    image_h, image_w = self._image_size(where, key, boxes, raw)
    return make_record(where, image_id=key, image_h=image_h, image_w=image_w, boxes=boxes,
                       features=self._arrays('image_features', raw),
                       feature_dim=self.feature_dim, num_classes=None)


def _decode_text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


Reader = (LxmertTsvReader | UniterLmdbReader | NpyFolderReader | VilbertLmdbReader
          | ButdHdf5Reader)


def scan(readers: Sequence[Reader], report: ErrorReport,
         on_record: Callable[[ImageRecord], None] | None = None) -> list[tuple[Reader, Any]]:
  """Decodes every record of `readers` in order; returns (reader, key) of the good ones.

  A malformed record or an image id seen before (in any reader) goes to `report`
  (raised, or skipped and counted).
  """
  kept = []
  first_seen: dict[str, str] = {}
  for reader in readers:
    for key, raw in reader.iter_raw():
      try:
        record = reader.decode(key, raw)
        where = reader.describe(key)
        if record.image_id in first_seen:
          raise FormatError(where, f'duplicate image id {record.image_id!r} (first seen at '
                            f'{first_seen[record.image_id]})', kind='duplicate image id')
      except FormatError as e:
        report.handle(e)
        continue
      first_seen[record.image_id] = where
      kept.append((reader, key))
      if on_record is not None:
        on_record(record)
  return kept
