"""Streaming pretraining input pipeline: TFDS ArrayRecord tables -> global batches.

The pipeline is a grain `MapDataset` over text-record indices:

  range(num_sentences) -> this process's shard -> shuffle (reseeded each epoch)
  -> repeat forever -> batch of indices -> `examples.BatchAssembler` (one
  vectorised step per batch: read the text records, draw negatives, tokenise,
  gather the image records of the batch in one ArrayRecord read, build each
  design's region inputs)

so an iterator's state is one integer per stream (grain's), restores exactly,
and works with grain's orbax checkpoint handler. Batches become global
`jax.Array`s with the batch axis over the mesh's data axes.

`tables` opens and reads the tables; `examples` turns their records into the
pairs, negatives and region inputs of a batch.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Sequence

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlpjax.data import examples, tables
from vlpjax.models import design as design_lib


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
      gqa_dataset=None,
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
      # A local directory for a raw copy of the images table's region arrays,
      # memory-mapped and gathered per batch without decoding records (tables
      # larger than memory); built on first use. None: read the table's records.
      images_store_dir=None,
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


def batch_layout(data_config: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                 mesh: Mesh | None, data_axes: Sequence[str]
                 ) -> tuple[tuple[int, int], int, NamedSharding | None]:
  """(this process's rows [start, stop) of each global batch, the data seed, the
  batch sharding or None).

  The data seed is `data.seed` when set, else the run's `seed`.

  Raises:
    ValueError: a global batch the processes or the data axes do not divide, or
      a seed outside [0, 2**32).
  """
  process_count = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be a positive multiple '
                     f'of the process count {process_count}')
  sharding = None if mesh is None else batch_sharding(mesh, data_axes, global_batch_size)
  local = global_batch_size // process_count
  rows = (jax.process_index() * local, (jax.process_index() + 1) * local)
  if sharding is not None:
    rows = process_batch_rows(sharding, global_batch_size)[jax.process_index()]
  seed = seed if data_config.seed is None else data_config.seed
  if not 0 <= seed < 2**32:
    raise ValueError(f'data seed must be in [0, 2**32), got {seed}')
  return rows, seed, sharding


def process_batch_rows(sharding: NamedSharding, global_batch_size: int
                       ) -> dict[int, tuple[int, int]]:
  """{process: [start, stop)}, the rows of a global batch each process's devices
  hold under `sharding` (from its device -> index map, not assumed).

  Every process builds only its rows (`endless_batches`), so the layout must
  give each one a contiguous block of its own, all of one size.

  Raises:
    ValueError naming the mesh and each process's rows when processes share
      rows (a batch shard replicated across hosts, e.g. a `tensor` axis that
      spans them, or a mesh (1,1,8) over 2 processes): their replicas would
      silently receive different examples.
  """
  rows: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((global_batch_size,)).items():
    rows.setdefault(device.process_index, set()).update(
        range(*index[0].indices(global_batch_size)))
  blocks = {p: (min(r), max(r) + 1) for p, r in sorted(rows.items())}
  expected = global_batch_size // len(blocks)
  fits = (all(len(rows[p]) == stop - start == expected for p, (start, stop) in blocks.items())
          and sum(len(r) for r in rows.values()) == global_batch_size)
  if not fits:
    mesh = sharding.mesh
    layout = ', '.join(f'process {p}: rows {sorted(rows[p])[:4]}{"..." if len(rows[p]) > 4 else ""}'
                       f' ({len(rows[p])})' for p in blocks)
    raise ValueError(
        f'the batch layout does not split over the {len(blocks)} processes: mesh '
        f'{dict(mesh.shape)} shards the batch over {tuple(sharding.spec[0] or ())} '
        f'({global_batch_size} rows), and {layout}; each process must hold its own '
        'contiguous block of rows, or its replicas would receive different examples. '
        'Make the data axes (config.mesh.data_axes) span the processes, e.g. '
        "--config.mesh.shape='(-1,1,1)', and keep the other axes within a host")
  return blocks


def endless_batches(data_config: ml_collections.ConfigDict, num_examples: int,
                    global_batch_size: int, rows: tuple[int, int], seed: int,
                    make_batch: Callable[..., dict[str, np.ndarray]],
                    batch_kwargs: Callable[[int], dict[str, Any]] | None = None
                    ) -> grain.IterDataset:
  """This process's rows of endless global batches of examples [0, num_examples),
  prefetched.

  One global stream: position q = b * global_batch_size + r (row r of batch b)
  is example perm_e(q mod N) of epoch e = q // N, each epoch shuffled afresh
  (grain's index shuffle, from `seed`). So the example at every position is a
  pure function of (seed, position), whatever the number of processes: a run
  resumes on another topology with the same global order, each process taking
  its `rows` [start, stop) (`batch_layout`). `make_batch(epochs [L], indices [L],
  **batch_kwargs(b))` builds this process's part of batch b, in
  `data.worker_count` worker processes or a prefetch thread (`batch_kwargs` is
  picklable where there are workers).
  """
  start, stop = rows
  dataset = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
  dataset = dataset.batch(global_batch_size, drop_remainder=True)

  def local_part(batch_number: int, examples: np.ndarray) -> dict[str, np.ndarray]:
    epochs = (batch_number * global_batch_size + np.arange(start, stop)) // num_examples
    kwargs = batch_kwargs(batch_number) if batch_kwargs is not None else {}
    return make_batch(epochs, np.asarray(examples[start:stop], np.int64), **kwargs)

  dataset = dataset.map_with_index(local_part)
  if data_config.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside an absl app use defaults.
      flags.FLAGS.mark_as_parsed()
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.worker_count,
                                     per_worker_buffer_size=data_config.worker_buffer_size))
  return dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=min(1, data_config.prefetch_batches),
      prefetch_buffer_size=data_config.prefetch_batches))


def _batch_options(negatives_at: Callable[[int], bool] | None,
                   captions_only_at: Callable[[int], bool] | None, batch_number: int
                   ) -> dict[str, bool]:
  """The assembler's options for batch `batch_number` (picklable for the workers)."""
  options = {}
  if negatives_at is not None:
    options['draw_negatives'] = bool(negatives_at(batch_number))
  if captions_only_at is not None:
    options['captions_only'] = bool(captions_only_at(batch_number))
  return options


def make_pretraining_iterator(data_config: ml_collections.ConfigDict, model_name: str, *,
                              global_batch_size: int, seed: int, mesh: Mesh | None = None,
                              data_axes: Sequence[str] = ('data', 'fsdp'),
                              split: str = 'train',
                              negatives_at: Callable[[int], bool] | None = None,
                              captions_only_at: Callable[[int], bool] | None = None
                              ) -> PretrainingIterator:
  """Endless, resumable pretraining batches for design `model_name`.

  Args:
    data_config: see `default_data_config()`.
    model_name: one of DESIGNS; sets the mismatch convention and region inputs.
    global_batch_size: examples per step over all processes.
    seed: run seed; `data.seed` overrides it for the data order when set.
    mesh: if given, batches are global `jax.Array`s sharded over `data_axes`.
    split: text split ('train', 'validation', 'test').
    negatives_at: whether batch b (train step b) draws negatives, at
      `data.mismatch_prob`; a batch without is all matched pairs. None: every
      batch. A step whose losses see matched pairs only (UNITER's MLM and
      region tasks) then pays for no pair it throws away.
    captions_only_at: whether batch b draws its sentences from the captions
      alone (`examples.BatchAssembler`, `captions_only`), e.g. a first stage
      before image QA; needs `data.qa`. None: from all of the sentence pool.

  Returns:
    An iterator of dicts (see the data contract): input_ids, text_mask,
    token_type_ids int32 [B, T]; region_feats [B, R, F] (the table's float16;
    float32 with `data.widen_features`); region_loc float32 [B, R, L];
    region_mask int32 [B, R]; object_ids, attr_ids int32 [B, R]; object_conf,
    attr_conf float32 [B, R]; class_probs [B, R, C] (ViLBERT, UNITER; dtype as
    region_feats); match_label int32 [B]; answer_scores float32 [B, A] and
    qa_valid, shows_question float32 [B] when `data.qa`.
  """
  design = design_lib.get_design(model_name)
  if data_config.qa and not design.recipe.image_qa:
    raise ValueError(f'data.qa=True is image-QA pretraining (LXMERT\'s); {model_name} '
                     'has no QA objective')
  if not 0.0 <= data_config.mismatch_prob <= 1.0:
    raise ValueError(f'data.mismatch_prob must be in [0, 1], got {data_config.mismatch_prob}')
  if captions_only_at is not None and not data_config.qa:
    raise ValueError('captions_only_at (config.pretrain.first_stage_sentences=\'captions\') '
                     'needs data.qa=True: without questions every sentence is a caption')
  rows, seed, sharding = batch_layout(data_config, global_batch_size, seed, mesh, data_axes)
  assembler = examples.make_batch_assembler(data_config, design, split=split, seed=seed)
  num_sentences, images = assembler.num_sentences, assembler.images
  sentences = assembler.sentences

  stream = endless_batches(
      data_config, num_sentences, global_batch_size, rows, seed, assembler,
      None if negatives_at is None and captions_only_at is None
      else functools.partial(_batch_options, negatives_at, captions_only_at))
  # The process count is not part of it: the global order does not depend on it.
  fingerprint = dict(
      design=model_name, seed=seed, global_batch_size=global_batch_size,
      split=split, num_sentences=num_sentences,
      num_images=images.num_images,
      tables=[tables.table_name(data_config, t)
              for t in ('images', 'captions', 'vqa')[:1 + len(sentences)]],
      max_text_len=data_config.max_text_len, max_regions=data_config.max_regions,
      mismatch_prob=data_config.mismatch_prob, worker_count=data_config.worker_count)
  if negatives_at is not None:  # absent otherwise: earlier states still restore
    fingerprint['negatives'] = 'by step'
  if captions_only_at is not None:
    fingerprint['captions_only'] = 'by step'
  # cache_images and widen_features change no value in the batches (widening is
  # exact), so they are not part of the fingerprint.
  return PretrainingIterator(iter(stream), fingerprint, sharding)
