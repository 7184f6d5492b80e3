"""Writers of tiny fixture files in the exact formats researchers already have.

Region features: LXMERT TSV, UNITER LMDB (+ nbb JSON), per-image .npz / Pythia
.npy folders, ViLBERT pickled LMDB, BUTD HDF5 (+ its image-id index). Annotations: COCO captions (official and
Karpathy), Visual Genome region descriptions, VQA v2 questions/annotations,
GQA questions (GQA's balanced files and LXMERT's json).
Each writer takes plain python/numpy data so tests can corrupt it first.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
from typing import Any, Sequence

import h5py
import lmdb
import msgpack
import numpy as np

FEATURE_DIM = 16
NUM_CLASSES = 11  # detector classes incl. background, for class_probs fixtures


def random_image(rng: np.random.Generator, image_id: str, num_boxes: int = 3,
                 feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES,
                 image_h: int = 48, image_w: int = 64) -> dict[str, Any]:
  """One image's detector output with valid pixel boxes inside the image."""
  x1 = rng.uniform(0, image_w / 2, num_boxes)
  y1 = rng.uniform(0, image_h / 2, num_boxes)
  x2 = x1 + rng.uniform(1, image_w / 2, num_boxes)
  y2 = y1 + rng.uniform(1, image_h / 2, num_boxes)
  class_probs = rng.dirichlet(np.ones(num_classes), num_boxes).astype(np.float32)
  return dict(
      image_id=image_id, image_h=image_h, image_w=image_w,
      boxes=np.stack([x1, y1, x2, y2], -1).astype(np.float32),
      features=rng.uniform(0, 4, (num_boxes, feature_dim)).astype(np.float32),
      objects_id=rng.integers(0, num_classes - 1, num_boxes).astype(np.int64),
      objects_conf=rng.uniform(0, 1, num_boxes).astype(np.float32),
      attrs_id=rng.integers(0, 7, num_boxes).astype(np.int64),
      attrs_conf=rng.uniform(0, 1, num_boxes).astype(np.float32),
      class_probs=class_probs)


def random_images(seed: int, image_ids: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
  rng = np.random.default_rng(seed)
  return [random_image(rng, image_id, num_boxes=2 + i % 3, **kwargs)
          for i, image_id in enumerate(image_ids)]


def b64(array: np.ndarray) -> str:
  return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def lxmert_tsv_row(image: dict[str, Any]) -> str:
  """One TSV line (no newline) as LXMERT's extraction script writes it."""
  return '\t'.join([
      image['image_id'], str(image['image_h']), str(image['image_w']),
      b64(image['objects_id']), b64(image['objects_conf']),
      b64(image['attrs_id']), b64(image['attrs_conf']),
      str(len(image['boxes'])), b64(image['boxes']), b64(image['features'])])


def write_lxmert_tsv(path: str, images: Sequence[dict[str, Any]],
                     rows: Sequence[str] | None = None) -> str:
  """Writes `images` (or raw `rows`, for corrupt files) as an LXMERT TSV."""
  rows = [lxmert_tsv_row(image) for image in images] if rows is None else rows
  with open(path, 'w') as f:
    f.write(''.join(row + '\n' for row in rows))
  return path


def uniter_value(image: dict[str, Any], extra_rows: int = 0, compress: bool = True) -> bytes:
  """A UNITER LMDB value: fp16 arrays, normalised 6-d boxes, `extra_rows` boxes
  past the JSON's count (UNITER keeps only the first nbb)."""
  w, h = image['image_w'], image['image_h']
  boxes = image['boxes'] / np.array([w, h, w, h], np.float32)
  norm_bb = np.concatenate([boxes, boxes[:, 2:] - boxes[:, :2]], -1)
  pad = lambda x: np.concatenate([x, x[:1].repeat(extra_rows, 0)], 0)
  arrays = dict(features=pad(image['features']).astype(np.float16),
                norm_bb=pad(norm_bb).astype(np.float16),
                conf=pad(image['objects_conf']).astype(np.float16),
                soft_labels=pad(image['class_probs']).astype(np.float16))
  if compress:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
  # UNITER's uncompressed LMDBs: msgpack with msgpack-numpy's array encoding.
  encoded = {k: {'nd': True, 'type': v.dtype.str, 'kind': '', 'shape': list(v.shape),
                 'data': v.tobytes()} for k, v in arrays.items()}
  return msgpack.packb(encoded, use_bin_type=True)


def write_uniter_dir(image_dir: str, images: Sequence[dict[str, Any]],
                     compress: bool = True, extra_rows: int = 2,
                     values: dict[str, bytes] | None = None,
                     box_counts: dict[str, int] | None = None) -> str:
  """A UNITER image dir: `feat_th0.2_max100_min10/` LMDB + `nbb_th0.2_max100_min10.json`.

  `values`/`box_counts` override the generated ones (for corrupt fixtures).
  """
  os.makedirs(image_dir, exist_ok=True)
  if values is None:
    values = {im['image_id']: uniter_value(im, extra_rows, compress) for im in images}
  if box_counts is None:
    box_counts = {im['image_id']: len(im['boxes']) for im in images}
  env = lmdb.open(os.path.join(image_dir, 'feat_th0.2_max100_min10'), map_size=1 << 26)
  with env.begin(write=True) as txn:
    for key, value in values.items():
      txn.put(key.encode(), value)
  env.close()
  with open(os.path.join(image_dir, 'nbb_th0.2_max100_min10.json'), 'w') as f:
    json.dump(box_counts, f)
  return image_dir


def write_npz_folder(folder: str, images: Sequence[dict[str, Any]],
                     with_class_probs: bool = False) -> str:
  """Per-image `<id>.npz` archives (py-bottom-up-attention style keys)."""
  os.makedirs(folder, exist_ok=True)
  for image in images:
    arrays = dict(x=image['features'], bbox=image['boxes'], num_bbox=len(image['boxes']),
                  image_h=image['image_h'], image_w=image['image_w'],
                  objects_id=image['objects_id'], objects_conf=image['objects_conf'],
                  attrs_id=image['attrs_id'], attrs_conf=image['attrs_conf'])
    if with_class_probs:
      arrays['cls_prob'] = image['class_probs']
    np.savez(os.path.join(folder, image['image_id'] + '.npz'), **arrays)
  return folder


def write_pythia_folder(folder: str, images: Sequence[dict[str, Any]]) -> str:
  """Pythia style: `<id>.npy` features and a pickled `<id>_info.npy` dict."""
  os.makedirs(folder, exist_ok=True)
  for image in images:
    np.save(os.path.join(folder, image['image_id'] + '.npy'), image['features'])
    info = dict(bbox=image['boxes'], num_boxes=len(image['boxes']),
                image_height=image['image_h'], image_width=image['image_w'],
                objects=image['objects_id'], cls_prob=image['class_probs'])
    np.save(os.path.join(folder, image['image_id'] + '_info.npy'), info, allow_pickle=True)
  return folder


def write_vilbert_lmdb(path: str, images: Sequence[dict[str, Any]]) -> str:
  """ViLBERT's LMDB: pickled dicts with base64 arrays, plus a pickled 'keys' list."""
  env = lmdb.open(path, map_size=1 << 26)
  with env.begin(write=True) as txn:
    for image in images:
      item = dict(image_id=image['image_id'], image_h=image['image_h'],
                  image_w=image['image_w'], num_boxes=len(image['boxes']),
                  boxes=b64(image['boxes']), features=b64(image['features']))
      txn.put(image['image_id'].encode(), pickle.dumps(item))
    txn.put(b'keys', pickle.dumps([im['image_id'].encode() for im in images]))
  env.close()
  return path


def butd_spatial_features(image: dict[str, Any]) -> np.ndarray:
  """[N, 6] as the BUTD converter computes them: x1/w, y1/h, x2/w, y2/h, bw/w, bh/h."""
  x1, y1, x2, y2 = np.asarray(image['boxes'], np.float32).T
  w, h = np.float32(image['image_w']), np.float32(image['image_h'])
  return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], -1)


def write_butd_hdf5(path: str, images: Sequence[dict[str, Any]], index: str = 'pkl',
                    adaptive: bool = False) -> str:
  """The bottom-up-attention VQA converter's HDF5: image_features, image_bb,
  spatial_features ([I, N, ...], or flat with pos_boxes when `adaptive`), image
  ids ints (COCO's). `index`: 'pkl' (`<stem>_imgid2idx.pkl`, protocol 2 as
  cPickle wrote it), 'json' (the same dict as JSON) or 'dataset' (`image_ids`
  in the file). Rows are written in reverse image order, so that row != position."""
  order = list(reversed(range(len(images))))
  stacked = {'image_features': [images[i]['features'] for i in order],
             'image_bb': [images[i]['boxes'] for i in order],
             'spatial_features': [butd_spatial_features(images[i]) for i in order]}
  ids = {int(images[i]['image_id']): row for row, i in enumerate(order)}
  with h5py.File(path, 'w') as f:
    for name, arrays in stacked.items():
      f.create_dataset(name, data=np.concatenate(arrays) if adaptive else np.stack(arrays),
                       dtype='f')
    if adaptive:
      counts = np.array([len(a) for a in stacked['image_bb']])
      ends = np.cumsum(counts)
      f.create_dataset('pos_boxes', data=np.stack([ends - counts, ends], -1))
    if index == 'dataset':
      f.create_dataset('image_ids', data=np.array(sorted(ids, key=ids.get), np.int64))
  stem = os.path.splitext(path)[0]
  if index == 'pkl':
    with open(stem + '_imgid2idx.pkl', 'wb') as f:
      pickle.dump(ids, f, protocol=2)
  elif index == 'json':
    with open(stem + '_imgid2idx.json', 'w') as f:
      json.dump({str(k): v for k, v in ids.items()}, f)
  return path


# ---------------------------------------------------------------------------
# Annotations.


def coco_file_name(split: str, coco_id: int) -> str:
  return f'COCO_{split}_{coco_id:012d}.jpg'


def write_coco_captions(path: str, split: str, captions: dict[int, list[str]],
                        first_caption_id: int = 1, image_size: tuple[int, int] = (48, 64),
                        extra_annotations: Sequence[dict[str, Any]] = ()) -> str:
  """Official `captions_<split>.json`: `images` and `annotations` lists."""
  images, annotations = [], []
  caption_id = first_caption_id
  for coco_id, texts in captions.items():
    images.append(dict(id=coco_id, file_name=coco_file_name(split, coco_id),
                       height=image_size[0], width=image_size[1]))
    for text in texts:
      annotations.append(dict(id=caption_id, image_id=coco_id, caption=text))
      caption_id += 1
  with open(path, 'w') as f:
    json.dump(dict(info={}, licenses=[], images=images,
                   annotations=annotations + list(extra_annotations)), f)
  return path


def write_karpathy(path: str, entries: Sequence[tuple[str, int, str, list[str]]]) -> str:
  """Karpathy's `dataset_coco.json`: entries (coco split, coco id, karpathy split, texts)."""
  images, sentence_id = [], 0
  for image_index, (coco_split, coco_id, split, texts) in enumerate(entries):
    sentences = []
    for text in texts:
      sentences.append(dict(tokens=text.lower().split(), raw=text, imgid=image_index,
                            sentid=sentence_id))
      sentence_id += 1
    images.append(dict(filepath=coco_split, filename=coco_file_name(coco_split, coco_id),
                       imgid=image_index, split=split, cocoid=coco_id, sentids=[
                           s['sentid'] for s in sentences], sentences=sentences))
  with open(path, 'w') as f:
    json.dump(dict(images=images, dataset='coco'), f)
  return path


def write_vg_regions(path: str, regions: dict[int, list[str]]) -> str:
  """VG `region_descriptions.json`: per image, its regions with phrases and boxes."""
  data, region_id = [], 1
  for image_id, phrases in regions.items():
    items = []
    for phrase in phrases:
      items.append(dict(region_id=region_id, image_id=image_id, phrase=phrase,
                        x=1, y=2, width=10, height=8))
      region_id += 1
    data.append(dict(id=image_id, regions=items))
  with open(path, 'w') as f:
    json.dump(data, f)
  return path


def write_vqa(folder: str, split: str, questions: Sequence[tuple[int, int, str, list[str]]],
              with_answers: bool = True) -> None:
  """VQA v2 `v2_OpenEnded_mscoco_<split>_questions.json` and (unless test)
  `v2_mscoco_<split>_annotations.json`; questions are (question_id, coco id,
  text, 10 raw answers); multiple_choice_answer is the most common raw answer."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f'v2_OpenEnded_mscoco_{split}_questions.json'), 'w') as f:
    json.dump(dict(task_type='Open-Ended', data_type='mscoco', data_subtype=split,
                   questions=[dict(question_id=q, image_id=i, question=t)
                              for q, i, t, _ in questions]), f)
  if not with_answers:
    return
  annotations = []
  for question_id, image_id, _, answers in questions:
    most_common = max(set(answers), key=answers.count)
    annotations.append(dict(
        question_id=question_id, image_id=image_id, question_type='what',
        answer_type='other', multiple_choice_answer=most_common,
        answers=[dict(answer=a, answer_confidence='yes', answer_id=k + 1)
                 for k, a in enumerate(answers)]))
  with open(os.path.join(folder, f'v2_mscoco_{split}_annotations.json'), 'w') as f:
    json.dump(dict(data_subtype=split, annotations=annotations), f)


def write_gqa_questions(path: str, questions: Sequence[tuple[str, str, str, str | None]]) -> str:
  """GQA's `<split>_balanced_questions.json` (or `submission_all_questions.json`
  when no question has an answer): {question id: {imageId, question, answer,
  fullAnswer, types, ...}}; questions are (question id, image id, text, answer
  or None)."""
  data = {}
  for question_id, image_id, text, answer in questions:
    entry = dict(imageId=image_id, question=text, isBalanced=True)
    if answer is not None:
      entry.update(answer=answer, fullAnswer=f'The answer is {answer}.',
                   types=dict(structural='query', semantic='attr', detailed='color'),
                   semantic=[], annotations={})
    data[question_id] = entry
  with open(path, 'w') as f:
    json.dump(data, f)
  return path


def write_lxmert_gqa(path: str, questions: Sequence[tuple[str, str, str, str | None]]) -> str:
  """LXMERT's `data/gqa/<split>.json`: [{question_id, img_id, sent, label:
  {answer: 1.0}}] (no label when the answer is None, as in submit.json)."""
  data = []
  for question_id, image_id, text, answer in questions:
    entry = dict(img_id=image_id, question_id=question_id, sent=text)
    if answer is not None:
      entry['label'] = {answer: 1.0}
    data.append(entry)
  with open(path, 'w') as f:
    json.dump(data, f)
  return path
