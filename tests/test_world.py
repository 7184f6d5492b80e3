"""The procedural world: determinism, pixel-only features, text consistent with scenes, vocab."""
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from vlpjax.data import vocab as vocab_lib
from vlpjax.data import world as world_lib

CONFIG = world_lib.WorldConfig(
    num_images=48, num_regions=12, min_regions=8, feature_dim=40, image_height=(56, 72),
    image_width=(64, 88), num_objects=(2, 5), captions_per_image=4, questions_per_image=6,
    refexps_per_image=3, split_fractions=(0.5, 0.25, 0.25))


@pytest.fixture(scope='module')
def world():
  return world_lib.World(CONFIG)


def parse_phrase(phrase: str) -> tuple[int | None, int | None, int | None]:
  """'small red circle' / 'red object' / 'circles' -> (size, colour, shape) indices or None."""
  size = colour = shape = None
  for word in phrase.split():
    if word in world_lib.SIZES:
      size = world_lib.SIZES.index(word)
    elif word in world_lib.COLOURS:
      colour = world_lib.COLOURS.index(word)
    elif word not in ('object', 'objects'):
      singular = {world_lib.SHAPES[k] + suffix: k for k in range(len(world_lib.SHAPES))
                  for suffix in ('', 's', 'es')}
      shape = singular[word]
  return size, colour, shape


def matching(scene, phrase):
  size, colour, shape = parse_phrase(phrase)
  return [o for o in scene.objects if (size is None or o.size == size)
          and (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def test_same_seed_same_bytes_other_seed_differs():
  other = dataclasses.replace(CONFIG, seed=1)
  extractor = world_lib.FeatureExtractor(CONFIG.feature_dim)
  for index in range(3):
    images, detections, features = [], [], []
    for config in (CONFIG, CONFIG, other):
      scene = world_lib.make_scene(config, index)
      images.append(world_lib.render(scene, config.seed))
      detections.append(world_lib.detect(scene, config))
      features.append(extractor(images[-1], detections[-1].boxes))
    assert images[0].tobytes() == images[1].tobytes()
    assert features[0].tobytes() == features[1].tobytes()
    for field in dataclasses.fields(world_lib.Detections):
      a, b = getattr(detections[0], field.name), getattr(detections[1], field.name)
      assert a.tobytes() == b.tobytes()
    assert images[0].tobytes() != images[2].tobytes()
  first, second = world_lib.World(CONFIG), world_lib.World(CONFIG)
  assert first.scenes == second.scenes
  assert first.captions == second.captions
  assert list(first.texts()) == list(second.texts())
  streamed = [list(w.image_examples(range(0, 5))) for w in (first, second)]
  for a, b in zip(*streamed):
    assert a['features'].tobytes() == b['features'].tobytes()


def test_images_table_rows_follow_contract(world):
  rows = list(world.image_examples(range(3, 9)))
  assert [r['index'] for r in rows] == list(range(3, 9))
  for row in rows:
    scene = world.scenes[row['index']]
    det = world_lib.detect(scene, CONFIG)
    np.testing.assert_array_equal(row['boxes'], det.boxes)
    pixels = world_lib.render(scene, CONFIG.seed)
    np.testing.assert_array_equal(
        row['features'], world.feature_extractor(pixels, det.boxes).astype(np.float16))
    n = row['num_boxes']
    assert CONFIG.min_regions <= n <= CONFIG.num_regions
    assert row['boxes'].shape == (n, 4) and row['boxes'].dtype == np.float32
    assert row['features'].shape == (n, CONFIG.feature_dim) and row['features'].dtype == np.float16
    assert row['class_probs'].shape == (n, len(world_lib.OBJECT_CLASSES))
    np.testing.assert_allclose(row['class_probs'].astype(np.float32).sum(-1), 1, atol=5e-3)
    assert np.all(row['boxes'][:, 2:] > row['boxes'][:, :2])
    assert np.all(row['boxes'][:, 2] <= row['image_w'])
    assert np.all(row['boxes'][:, 3] <= row['image_h'])
    assert np.all((row['object_ids'] >= 0) & (row['object_ids'] < len(world_lib.SHAPES)))
    assert np.all((row['attr_ids'] >= 0) & (row['attr_ids'] < len(world_lib.COLOURS)))
    assert np.all(np.diff(row['object_conf']) <= 0)  # sorted by confidence


def test_features_come_from_pixels():
  scene = world_lib.make_scene(CONFIG, 0)
  extractor = world_lib.FeatureExtractor(CONFIG.feature_dim)
  boxes = scene.boxes
  base = extractor(world_lib.render(scene, CONFIG.seed), boxes)
  # Recolouring object 0 changes its region's features and leaves regions that do
  # not come near it bit-identical.
  recoloured = dataclasses.replace(scene, objects=(dataclasses.replace(
      scene.objects[0], colour=(scene.objects[0].colour + 5) % len(world_lib.COLOURS)),)
      + scene.objects[1:])
  changed = extractor(world_lib.render(recoloured, CONFIG.seed), boxes)
  assert np.abs(changed[0] - base[0]).max() > 0.05
  grown = boxes[0] + np.array([-2, -2, 2, 2])
  far = [k for k in range(1, len(boxes)) if world_lib.box_iou(boxes[k:k + 1] + [-2, -2, 2, 2],
                                                             grown[None])[0, 0] == 0]
  assert far, 'scene 0 should have an object away from object 0'
  np.testing.assert_array_equal(changed[far], base[far])


def test_identical_crops_identical_features():
  extractor = world_lib.FeatureExtractor(CONFIG.feature_dim)
  source = world_lib.render(world_lib.make_scene(CONFIG, 1), CONFIG.seed)
  target = world_lib.render(world_lib.make_scene(CONFIG, 2), CONFIG.seed).copy()
  box = np.array([[10.0, 12.0, 34.0, 30.0]], np.float32)
  offset = np.array([17, 9])  # (dx, dy), whole pixels
  # Copy the crop plus one pixel beyond (the edge channel looks one pixel past the box).
  target[12 + 9:31 + 9, 10 + 17:35 + 17] = source[12:31, 10:35]
  moved = box + np.concatenate([offset, offset])[None].astype(np.float32)
  np.testing.assert_array_equal(extractor(source, box), extractor(target, moved))
  # ... while a different crop of the same image gives different features.
  assert not np.array_equal(extractor(source, box), extractor(source, box + 15))


def test_detector_labels_follow_the_boxes(world):
  hits = total = background_hits = background_total = 0
  for scene in world.scenes[:24]:
    det = world_lib.detect(scene, CONFIG)
    iou = world_lib.box_iou(det.boxes, scene.boxes)
    best = iou.argmax(1)
    for k in range(len(det.boxes)):
      if iou[k, best[k]] >= 0.7:
        total += 1
        hits += det.object_ids[k] == scene.objects[best[k]].shape
      elif iou[k].max() < 0.2:
        background_total += 1
        background_hits += det.class_probs[k].argmax() == 0
    # Every object has a box that overlaps it well.
    assert np.all(iou.max(0) >= 0.5)
  assert hits / total > 0.8, (hits, total)
  assert background_hits / background_total > 0.8, (background_hits, background_total)


def test_vqa_answers_agree_with_the_scene(world):
  checked = top_is_truth = 0
  for rows in world.vqa.values():
    for row in rows:
      scene = world.scenes[row['image_index']]
      question = row['question']
      truth = None
      if m := re.fullmatch(r'how many (.+) are there\?', question):
        truth = str(len(matching(scene, m.group(1))))
      elif m := re.fullmatch(r'is there an? (.+)\?', question):
        truth = 'yes' if matching(scene, m.group(1)) else 'no'
      elif m := re.fullmatch(r'what (color|shape|size) is the ([a-z ]+)\?', question):
        if not {'of', 'above', 'below'} & set(m.group(2).split()):  # not about a neighbour
          (obj,) = matching(scene, m.group(2))  # the phrase picks out one object
          truth = {'color': world_lib.COLOURS[obj.colour], 'shape': world_lib.SHAPES[obj.shape],
                   'size': world_lib.SIZES[obj.size]}[m.group(1)]
      if truth is None:
        continue
      checked += 1
      labels, scores = row['answer_labels'], row['answer_scores']
      top_is_truth += world_lib.ANSWERS[labels[np.argmax(scores)]] == truth
      # The truth is what the careful majority says; all ten answers are plausible.
      assert all(a == truth or a in world_lib.confusable_answers(truth) for a in row['answers'])
  assert checked > 100
  assert top_is_truth / checked > 0.9


def test_relation_questions_agree_with_positions(world):
  checked = agree = 0
  for rows in world.vqa.values():
    for row in rows:
      m = re.fullmatch(r'is the ([a-z ]+) (to the left of|to the right of|above|below) '
                       r'the ([a-z ]+)\?', row['question'])
      if not m:
        continue
      scene = world.scenes[row['image_index']]
      (a,), (b,) = matching(scene, m.group(1)), matching(scene, m.group(3))
      holds = {'to the left of': a.cx < b.cx, 'to the right of': a.cx > b.cx,
               'above': a.cy < b.cy, 'below': a.cy > b.cy}[m.group(2)]
      majority = world_lib.ANSWERS[row['answer_labels'][np.argmax(row['answer_scores'])]]
      checked += 1
      agree += majority == ('yes' if holds else 'no')
  assert checked > 10
  assert agree / checked > 0.9


def test_soft_scores():
  answers = ['red'] * 4 + ['blue'] * 3 + ['green'] * 2 + ['pink']
  labels, scores = world_lib.soft_scores(answers)
  got = {world_lib.ANSWERS[l]: s for l, s in zip(labels, scores)}
  assert got == pytest.approx({'red': 1.0, 'blue': 0.9, 'green': 0.6, 'pink': 0.3})
  assert labels.dtype == np.int32 and scores.dtype == np.float32
  assert list(labels) == sorted(labels)


def test_refexps_pick_out_their_target(world):
  for rows in world.refexp.values():
    for row in rows:
      scene = world.scenes[row['image_index']]
      targets = [o for o in scene.objects if np.array_equal(o.box, row['target_box'])]
      assert len(targets) == 1
      text = row['text']
      if re.fullmatch(r'the [a-z]+( [a-z]+)?( [a-z]+)?', text) and 'most' not in text \
          and 'lowest' not in text:
        assert matching(scene, text[len('the '):]) == targets


def test_nlvr2_labels(world):
  labels = []
  for rows in world.nlvr2.values():
    for row in rows:
      left, right = world.scenes[row['left_image_index']], world.scenes[row['right_image_index']]
      assert row['left_image_index'] != row['right_image_index']
      labels.append(row['label'])
      if m := re.fullmatch(r'both images contain an? (.+)', row['text']):
        assert row['label'] == int(bool(matching(left, m.group(1)))
                                   and bool(matching(right, m.group(1))))
      if m := re.fullmatch(r'the two images contain (\w+) (.+) in total', row['text']):
        n = world_lib.NUMBER_WORDS.index(m.group(1))
        total = len(matching(left, m.group(2))) + len(matching(right, m.group(2)))
        assert row['label'] == int(n == total)
  assert 0.3 < np.mean(labels) < 0.7


def vcr_relation(words):
  """The RELATION_WORDS key of a relation's words ('to the left of' -> 'left')."""
  return {tuple(v.split()): k for k, v in world_lib.RELATION_WORDS.items()}[tuple(words)]


def test_vcr_choices_agree_with_the_scene(world):
  """One answer and one rationale of each example are true of the scene, the
  labelled ones; references index the scene's objects (the gt regions)."""
  answer_labels = []
  for rows in world.vcr.values():
    for row in rows:
      scene = world.scenes[row['image_index']]
      question, answers, rationales, objects = (
          json.loads(row[k]) for k in world_lib.VCR_JSON_FIELDS)
      assert objects == [world_lib.SHAPES[o.shape] for o in scene.objects]
      assert len(answers) == len(rationales) == world_lib.VCR_CHOICES
      i = next(t[0] for t in question if isinstance(t, list))
      a = scene.objects[i]
      if question[:3] == ['what', 'color', 'is']:
        true_answers = [c == [[i], 'is', world_lib.COLOURS[a.colour]] for c in answers]
        true_rationales = []
        for r in rationales:
          j = r[-1][0]
          true_rationales.append(
              r[:3] == [[i], 'is', 'the'] and r[3] == world_lib.COLOURS[a.colour]
              and r[4] == world_lib.SHAPES[a.shape]
              and vcr_relation(r[5:-1]) == world_lib.relation(a, scene.objects[j]))
      else:
        assert question == ['where', 'is', [i], '?']
        j = answers[0][-1][0]
        b = scene.objects[j]
        side = world_lib.relation(a, b)
        true_answers = [vcr_relation(c[2:-1]) == side for c in answers]
        described = lambda words, o: words == [world_lib.COLOURS[o.colour],
                                               world_lib.SHAPES[o.shape]]
        true_rationales = [described(r[1:3], a) and vcr_relation(r[4:-3]) == side
                           and described(r[-2:], b) for r in rationales]
      assert true_answers.count(True) == 1 and true_answers.index(True) == row['answer_label']
      assert (true_rationales.count(True) == 1
              and true_rationales.index(True) == row['rationale_label'])
      answer_labels.append(row['answer_label'])
  assert set(answer_labels) == set(range(world_lib.VCR_CHOICES))


def test_splits_partition_images(world):
  seen = set()
  for split in world_lib.SPLITS:
    images = set(world.split_images[split])
    assert not images & seen
    seen |= images
    for table in (world.captions, world.vqa, world.refexp, world.vcr):
      assert {row['image_index'] for row in table[split]} <= images
    for row in world.nlvr2[split]:
      assert {row['left_image_index'], row['right_image_index']} <= images
  assert seen == set(range(CONFIG.num_images))


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match='min_regions'):
    dataclasses.replace(CONFIG, min_regions=3)
  with pytest.raises(ValueError, match='split_fractions'):
    dataclasses.replace(CONFIG, split_fractions=(0.5, 0.5, 0.5))


def test_vocab_covers_the_text_and_is_deterministic(world, tmp_path):
  tokens = vocab_lib.train_vocab(world.texts(), CONFIG.vocab_size)
  assert tokens[:5] == list(world_lib.SPECIAL_TOKENS)
  assert len(set(tokens)) == len(tokens)
  path = tmp_path / 'vocab.txt'
  vocab_lib.write_vocab(tokens, path)
  tokenizer = vocab_lib.load_tokenizer(path)
  unk = tokens.index('[UNK]')
  for text in world.texts():
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids and unk not in ids, text
  # Words are whole tokens; an unseen word is spelled, not unknown.
  assert len(tokenizer.encode('red circle', add_special_tokens=False).ids) == 2
  assert unk not in tokenizer.encode('carrot', add_special_tokens=False).ids
  # Another process (other hash seeds in the Rust trainer) trains the same vocabulary.
  code = ('import sys; from vlpjax.data import vocab, world; '
          'sys.stdout.write("\\n".join(vocab.train_vocab(world.World(world.WorldConfig('
          f'**{dataclasses.asdict(CONFIG)!r})).texts(), {CONFIG.vocab_size})))')
  out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True)
  assert out.stdout.split('\n') == tokens


def test_vocab_too_small_is_an_error(world):
  with pytest.raises(ValueError, match='vocab_size'):
    vocab_lib.train_vocab(world.texts(), 60)
