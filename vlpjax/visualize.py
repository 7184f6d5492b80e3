r"""Attention maps of a trained run: which regions each word attends to, and back.

  python -m vlpjax.visualize --workdir=/tmp/vlpjax/uniter_small --example=3 \
      [--split=test] [--text="a red circle left of a blue square"] \
      [--checkpoint_step=N] [--output_dir=DIR]

Example N is row N of split --split of the run's captions table (its text and
its image); --text replaces the text. The run is any vlpjax workdir, pretraining
or fine-tuning, of any design: its backbone (`params['backbone']`) runs on
`[CLS] text [SEP]` and the image's regions with `return_attention=True`, and the
maps are read from the backbone contract's attention schema
(`vlpjax.models.layers`), so no design needs code here:

  word -> region  joint layers' text-query / region-key block, text_to_vision
  region -> word  joint layers' region-query / text-key block, vision_to_text

Written to --output_dir (default `<workdir>/attention/<split>_example<N>_step<S>`):
`word_to_region_<stream>_layer<i>.png` (rows: each head, then their mean;
columns: the word pieces; each cell the image with every region's box shaded by
the word's attention to it, summed where boxes overlap, scaled to the cell's
maximum), `region_to_word_<stream>_layer<i>.png` (per head, [regions, words]),
`attention.npz` (every attention of the schema at the real positions, keyed as
the schema) and `example.json` (text, word pieces, boxes). The image is the
rendered scene on the embedded world, elsewhere a grey canvas of the image's
size. Region slots a design puts before the detector regions (ViLBERT's [IMG])
are kept in attention.npz and left out of the pictures.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from typing import Any, Mapping, Sequence

from absl import app, flags
import jax
import ml_collections
from matplotlib.figure import Figure
import numpy as np

from vlpjax import checkpointing, config_lib, loading, paths
from vlpjax.data import tables, vlp_world, world
from vlpjax.models import get_design, get_model
from vlpjax.tasks import vqa


BACKBONE = 'backbone'
# Side of a cell's image in the word -> region mosaic, in pixels.
CELL_PIXELS = 96
# Streams whose probabilities hold word -> region (text queries, region keys) and
# region -> word attention; the joint stream holds both, as blocks.
WORD_TO_REGION = ('joint', 'text_to_vision')
REGION_TO_WORD = ('joint', 'vision_to_text')
CANVAS_GREY = 200


@dataclasses.dataclass(frozen=True)
class ExampleAttention:
  """One example's attention at its real positions (T words, S region slots).

  Attributes:
    tokens: the T word pieces, [CLS] and [SEP] included.
    boxes: [S - leading_slots, 4] the detector regions' boxes (x1, y1, x2, y2 in pixels).
    image_size: (width, height).
    leading_slots: region slots before the detector regions (ViLBERT's [IMG]).
    probs: schema key (`layers.attention_key`) -> float32 [heads, Q, K] over the
      real positions: joint [N, T+S, T+S] ([text; regions]), text [N, T, T],
      vision [N, S, S], text_to_vision [N, T, S], vision_to_text [N, S, T].
  """
  tokens: list[str]
  boxes: np.ndarray
  image_size: tuple[float, float]
  leading_slots: int
  probs: dict[str, np.ndarray]

  def _blocks(self, streams: Sequence[str], word_queries: bool) -> dict[str, np.ndarray]:
    t, first = len(self.tokens), self.leading_slots
    blocks = {}
    for key, p in self.probs.items():
      stream = key.split('/')[0]
      if stream not in streams:
        continue
      if stream == 'joint':
        p = p[:, :t, t:] if word_queries else p[:, t:, :t]
      blocks[key] = p[:, :, first:] if word_queries else p[:, first:, :]
    return blocks

  def word_to_region(self) -> dict[str, np.ndarray]:
    """Schema key -> [N, T, R] each word's attention over the detector regions."""
    return self._blocks(WORD_TO_REGION, word_queries=True)

  def region_to_word(self) -> dict[str, np.ndarray]:
    """Schema key -> [N, R, T] each detector region's attention over the words."""
    return self._blocks(REGION_TO_WORD, word_queries=False)


class AttentionModel:
  """A design's backbone returning attention probabilities for one example.

  Attributes:
    config: the run's config; tokenizer: its tokenizer; model: the backbone;
    params: its params (None until `from_workdir` or the caller sets them);
    step: the checkpoint's step.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any):
    self.config = config
    self.design = get_design(config.model.name)
    self.tokenizer = tokenizer
    self._id_to_token = {i: t for t, i in tokenizer.vocab.items()}
    self.model = get_model(config.model, pretraining=False)
    self.params, self.step = None, 0
    self._attention = jax.jit(lambda params, kwargs: self.model.apply(
        {'params': params}, **kwargs, deterministic=True, return_attention=True)['attention'])

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> AttentionModel:
    """The backbone of the run in `workdir` (any task) at checkpoint `step`
    (None: the newest), on the first device."""
    config = loading.read_run_config(workdir)
    model = cls(config, vqa.run_tokenizer(config, workdir))
    abstract = vqa.abstract_params(model.model, model.inputs('?', *vqa.blank_image(config)))
    model.params, model.step = checkpointing.restore_workdir_params(
        workdir, abstract, subtree=BACKBONE, step=step)
    return model

  def inputs(self, text: str, features: np.ndarray, boxes: np.ndarray,
             image_size: tuple[float, float]) -> dict[str, np.ndarray]:
    """Backbone inputs [1, ...] of `[CLS] text [SEP]` over one image: features
    [N, F], boxes [N, 4] (pixels), image_size (width, height)."""
    encoded = self.tokenizer.encode([text])
    regions = vqa.image_regions(self.config, self.design, features, boxes, image_size, 1)
    return dict(encoded, **regions)

  def attention(self, text: str, features: np.ndarray, boxes: np.ndarray,
                image_size: tuple[float, float]) -> ExampleAttention:
    """The example's attention (see `inputs` for the arguments)."""
    inputs = self.inputs(text, features, boxes, image_size)
    return real_positions(inputs, jax.device_get(self._attention(self.params, inputs)),
                          [self._id_to_token[int(i)] for i in inputs['input_ids'][0]],
                          self.design.leading_slots, np.asarray(boxes, np.float32),
                          image_size)


def real_positions(inputs: Mapping[str, np.ndarray], attention: Mapping[str, np.ndarray],
                   tokens: Sequence[str], leading_slots: int, boxes: np.ndarray,
                   image_size: tuple[float, float]) -> ExampleAttention:
  """The first example of a backbone's `attention` (schema key -> [B, N, Q, K])
  at the real positions of `inputs` (text_mask [B, T], region_mask [B, S]);
  `tokens`: the word pieces of inputs' T slots."""
  text_mask = np.asarray(inputs['text_mask'][0], bool)
  region_mask = np.asarray(inputs['region_mask'][0], bool)
  joint = np.concatenate([text_mask, region_mask])
  positions = dict(joint=(joint, joint), text=(text_mask, text_mask),
                   vision=(region_mask, region_mask),
                   text_to_vision=(text_mask, region_mask),
                   vision_to_text=(region_mask, text_mask))
  probs = {}
  for key, p in attention.items():
    queries, keys = positions[key.split('/')[0]]
    probs[key] = np.asarray(p[0], np.float32)[:, queries][:, :, keys]
  num_regions = int(region_mask.sum()) - leading_slots
  return ExampleAttention(
      tokens=[t for t, real in zip(tokens, text_mask) if real],
      boxes=boxes[:num_regions], image_size=(float(image_size[0]), float(image_size[1])),
      leading_slots=leading_slots, probs=probs)


# ----------------------------------------------------------------------------
# Pictures.


def example_image(config: ml_collections.ConfigDict, image_index: int,
                  image_size: tuple[float, float]) -> np.ndarray:
  """uint8 [H, W, 3]: the rendered scene `image_index` on the embedded world,
  elsewhere a grey canvas of `image_size` (width, height)."""
  if config.data.name == 'vlp_world':
    world_config = vlp_world.WORLD_SIZES[config.data.size]
    return world.render(world.make_scene(world_config, image_index), world_config.seed)
  width, height = (max(int(round(s)), 1) for s in image_size)
  return np.full((height, width, 3), CANVAS_GREY, np.uint8)


def _thumbnail(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image resized so its longer side is CELL_PIXELS, float [h, w, 3] in [0, 1];
  each box's pixels in it, float [R, h, w])."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  scale = CELL_PIXELS / max(height, width)
  w, h = max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)
  small = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), np.float32) / 255
  x, y = (np.arange(w) + 0.5) / scale, (np.arange(h) + 0.5) / scale  # pixel centres
  inside_x = (x[None] >= boxes[:, :1]) & (x[None] <= boxes[:, 2:3])   # [R, w]
  inside_y = (y[None] >= boxes[:, 1:2]) & (y[None] <= boxes[:, 3:4])  # [R, h]
  return small, (inside_y[:, :, None] & inside_x[:, None, :]).astype(np.float32)


def spotlight_mosaic(image: np.ndarray, boxes: np.ndarray, weights: np.ndarray
                     ) -> np.ndarray:
  """float [rows * (h + 2), cols * (w + 2), 3]: for weights [rows, cols, R], cell
  (i, j) is the thumbnail lit where boxes with weight are (the sum of the weights
  of the boxes over a pixel, scaled to the cell's maximum), dark elsewhere."""
  small, box_pixels = _thumbnail(image, boxes)
  rows, cols, _ = weights.shape
  h, w = small.shape[:2]
  heat = np.tensordot(weights, box_pixels, axes=(2, 0))  # [rows, cols, h, w]
  heat /= np.maximum(heat.max(axis=(2, 3), keepdims=True), 1e-12)
  cells = small * (0.2 + 0.8 * heat[..., None])           # [rows, cols, h, w, 3]
  mosaic = np.ones((rows, h + 2, cols, w + 2, 3), np.float32)
  mosaic[:, 1:-1, :, 1:-1] = cells.transpose(0, 2, 1, 3, 4)
  return mosaic.reshape(rows * (h + 2), cols * (w + 2), 3)


def _head_labels(num_heads: int) -> list[str]:
  return [f'head {n}' for n in range(num_heads)] + ['mean']


def _with_mean(p: np.ndarray) -> np.ndarray:
  """[N, Q, K] -> [N + 1, Q, K], the heads' mean last."""
  return np.concatenate([p, p.mean(0, keepdims=True)])


def _png(figure: Any) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  return buffer.getvalue()


def word_to_region_png(key: str, weights: np.ndarray, example: ExampleAttention,
                       image: np.ndarray) -> bytes:
  """PNG of `weights` [N, T, R] (`ExampleAttention.word_to_region()[key]`): rows
  the heads and their mean, columns the word pieces."""
  per_head = _with_mean(weights)
  mosaic = spotlight_mosaic(image, example.boxes, per_head)
  rows, cols = per_head.shape[:2]
  cell_h, cell_w = mosaic.shape[0] / rows, mosaic.shape[1] / cols
  figure = Figure(figsize=(mosaic.shape[1] / 80 + 1.5, mosaic.shape[0] / 80 + 1.2))
  axes = figure.add_subplot()
  axes.imshow(mosaic)
  axes.set_xticks((np.arange(cols) + 0.5) * cell_w, example.tokens, rotation=60, ha='right')
  axes.set_yticks((np.arange(rows) + 0.5) * cell_h, _head_labels(rows - 1))
  axes.tick_params(length=0)
  axes.set_title(f'{key}: word -> region')
  return _png(figure)


def region_to_word_png(key: str, weights: np.ndarray, example: ExampleAttention) -> bytes:
  """PNG of `weights` [N, R, T] (`ExampleAttention.region_to_word()[key]`): one
  [regions, words] panel per head and one of their mean."""
  per_head = _with_mean(weights)
  cols = min(len(per_head), 4)
  rows = -(-len(per_head) // cols)
  figure = Figure(figsize=(cols * (1.2 + 0.22 * len(example.tokens)),
                           rows * (1.2 + 0.12 * weights.shape[1])))
  axes = figure.subplots(rows, cols, squeeze=False)
  for panel, (axis, label) in enumerate(zip(axes.flat, _head_labels(len(weights)))):
    shown = axis.imshow(per_head[panel], aspect='auto', cmap='viridis', vmin=0,
                        vmax=per_head.max())
    axis.set_xticks(np.arange(len(example.tokens)), example.tokens, rotation=60, ha='right',
                    fontsize=7)
    axis.set_ylabel('region', fontsize=7)
    axis.tick_params(labelsize=7)
    axis.set_title(label, fontsize=8)
  for axis in list(axes.flat)[len(per_head):]:
    axis.axis('off')
  figure.colorbar(shown, ax=axes, shrink=0.6, label='attention')
  figure.suptitle(f'{key}: region -> word')
  return _png(figure)


def file_stem(direction: str, key: str) -> str:
  """'word_to_region', 'joint/layer_3' -> 'word_to_region_joint_layer3'."""
  stream, layer = key.split('/')
  return f'{direction}_{stream}_{layer.replace("_", "")}'


def draw(example: ExampleAttention, image: np.ndarray, output_dir: str) -> list[str]:
  """Writes the module docstring's PNG files of `example` over `image` (uint8
  [H, W, 3] in the boxes' pixels) and `attention.npz` into `output_dir`; returns
  the PNG paths."""
  directory = paths.path(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  pictures = [('word_to_region', key, lambda k=key, w=w: word_to_region_png(k, w, example, image))
              for key, w in example.word_to_region().items()]
  pictures += [('region_to_word', key, lambda k=key, w=w: region_to_word_png(k, w, example))
               for key, w in example.region_to_word().items()]
  for direction, key, render in pictures:
    target = directory / f'{file_stem(direction, key)}.png'
    target.write_bytes(render())
    written.append(str(target))
  buffer = io.BytesIO()
  np.savez(buffer, **{key: p for key, p in example.probs.items()})
  (directory / 'attention.npz').write_bytes(buffer.getvalue())
  return written


def visualize_example(workdir: str, example: int, *, split: str = 'test',
                      text: str | None = None, checkpoint_step: int | None = None,
                      output_dir: str | None = None) -> str:
  """Draws the attention of caption row `example` of the run's `split` (module
  docstring); returns the output directory."""
  model = AttentionModel.from_workdir(workdir, checkpoint_step)
  config = model.config
  captions = tables.open_table(config.data, 'captions', split)
  if not 0 <= example < len(captions):
    raise ValueError(f'--example={example}: split {split!r} of '
                     f'{tables.table_name(config.data, "captions")} has {len(captions)} rows')
  row = captions[example]
  image_index = int(row['image_index'])
  images = tables.open_table(config.data, 'images', config.data.images_split)
  record = images[image_index]
  image_size = (float(record['image_w']), float(record['image_h']))
  text = text if text is not None else tables.as_text(row['text'])
  result = model.attention(text, record['features'], record['boxes'], image_size)
  output_dir = output_dir or paths.join(workdir, 'attention',
                                        f'{split}_example{example}_step{model.step}')
  written = draw(result, example_image(config, image_index, image_size), output_dir)
  (paths.path(output_dir) / 'example.json').write_text(json.dumps(dict(
      workdir=str(workdir), step=model.step, split=split, example=example,
      image_index=image_index, text=text, tokens=result.tokens,
      boxes=result.boxes.tolist(), image_size=list(image_size),
      leading_slots=result.leading_slots), indent=1), encoding='utf-8')
  logging.info('%s, step %d: %d attention maps of %r in %s', workdir, model.step,
               len(written), text, output_dir)
  return output_dir


def main() -> None:
  """The command line (flags defined here, not at import)."""
  workdir = flags.DEFINE_string('workdir', None, 'A vlpjax run\'s workdir (any task).')
  example = flags.DEFINE_integer('example', None, 'Row of the run\'s captions table split.')
  split = flags.DEFINE_string('split', 'test', 'Split of the captions table.')
  text = flags.DEFINE_string('text', None, 'Text in place of the caption\'s.')
  step = flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint; default: newest.')
  output_dir = flags.DEFINE_string('output_dir', None, 'Default: under the workdir.')
  flags.mark_flags_as_required(['workdir', 'example'])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config_lib.clean_logging()
    visualize_example(workdir.value, example.value, split=split.value, text=text.value,
                      checkpoint_step=step.value, output_dir=output_dir.value)

  app.run(run)


if __name__ == '__main__':
  main()
