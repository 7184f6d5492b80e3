"""TFDS builders for text tables from the annotation files users already have.

  coco_captions           COCO captions: official `captions_{train,val}2014.json`
                          (config 'official') or Karpathy's `dataset_coco.json`
                          (config 'karpathy': train = train + restval, val, test);
                          Flickr30k's `dataset_flickr30k.json` in the same
                          layout (`--file karpathy=dataset_flickr30k.json`;
                          image ids are its file stems)
  vg_region_descriptions  Visual Genome `region_descriptions.json` (pretraining text)
  vqa_v2                  VQA v2 questions + annotations, soft scores
                          min(1, 0.3 * count) over an answer vocabulary built
                          from the training answers, stored as `answers.txt`
  gqa                     GQA questions with their one answer: GQA's
                          `*_balanced_questions.json` or LXMERT's json lists
                          (the format read from each file), an answer
                          vocabulary from the training answers (`answers.txt`)
  snli_ve                 SNLI-VE `snli_ve_{train,dev,test}.jsonl`: statements
                          about Flickr30k images and their 3-way gold label
  nlvr2                   NLVR2: lil-lab's jsonl `{train,dev,test1,test2}.json`
                          or LXMERT's json lists: a sentence, two images, True/False
  vcr                     VCR: r2c's `{train,val,test}.jsonl`, a question, four
                          answers and four rationales that refer to the
                          image's objects by index
  refcoco                 RefCOCO/RefCOCO+/RefCOCOg: `refs(unc).p`/`refs(umd).p`
                          (pickles, only with --trust_pickle) or their JSON
                          conversion, with COCO `instances.json`: one row per
                          sentence, its target box

Text tables refer to the images table they were built against (config field
`images`, a TFDS name such as 'lxmert_tsv/coco') by row: every example carries
`image_index` and that table's `image_id`. Annotation and table ids are matched
by `formats.image_key` (default: the trailing number, so COCO id 9 matches
'COCO_train2014_000000000009'). A caption or question whose image is not in the
table raises an error naming the id, or with on_error='skip' is skipped and
counted in `ingest_report.json` beside the dataset.

A text table's metadata stores the fingerprint of the images table's ordered ids
it was built against (`features_builder.image_ids_fingerprint`): the pipeline
refuses to join it to an images table rebuilt since (other ids or order). Like
an images table, it is reused only when built again with the same settings, and
rebuilt with `--overwrite`.
"""
from __future__ import annotations

import abc
import argparse
import collections
import dataclasses
import functools
import io
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import tensorflow_datasets as tfds

from vlpjax import paths
from vlpjax.data import features_builder
from vlpjax.data import formats
from vlpjax.data import world as world_lib

ANSWERS_FILE = 'answers.txt'

# ---------------------------------------------------------------------------
# VQA answer normalisation, following the rules of the official VQA evaluation:
# punctuation dropped (or turned into a space when it separates nothing), a
# period kept only before a digit, number words as digits, articles removed,
# apostrophe-less contractions restored.

_PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-',
                '>', '<', '@', '`', ',', '?', '!')
_COMMA_BETWEEN_DIGITS = re.compile(r'(\d)(,)(\d)')
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r'\.(?!\d)')
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
                 'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = frozenset(['a', 'an', 'the'])
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
    "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's i'd've i'm i've "
    "isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't shan't she'd've she's should've "
    "shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've twas wasn't we'd've we're we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've").split()
# Spellings without apostrophes that are words of their own stay as they are.
_REAL_WORDS = frozenset(['its', 'well', 'ill', 'id', 'wed', 'hell', 'shell', 'were',
                         'lets', 'cant', 'wont', 'shed', 'twas'])
_CONTRACTIONS = {word.replace("'", ''): word for word in _CONTRACTED
                 if word.replace("'", '') not in _REAL_WORDS}
_CONTRACTIONS.update({"cant": "can't", "wont": "won't"})  # as the official table


def normalize_answer(answer: str) -> str:
  """A VQA answer as the official evaluation compares it (see the rules above)."""
  text = answer.replace('\n', ' ').replace('\t', ' ').strip()
  out = text
  for mark in _PUNCTUATION:
    if mark + ' ' in text or ' ' + mark in text or _COMMA_BETWEEN_DIGITS.search(text):
      out = out.replace(mark, '')
    else:
      out = out.replace(mark, ' ')
  out = _PERIOD_NOT_BEFORE_DIGIT.sub('', out)
  words = [_NUMBER_WORDS.get(word, word) for word in out.lower().split()]
  return ' '.join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def answer_score(count: int) -> float:
  """Soft VQA score of an answer given by `count` of the 10 annotators."""
  return min(1.0, 0.3 * count)


def frequent_answers(answers: Iterable[str], min_count: int) -> list[str]:
  """The answers given at least `min_count` times, most frequent first (ties
  alphabetical)."""
  counts = collections.Counter(answers)
  kept = [answer for answer, count in counts.items() if count >= min_count]
  return sorted(kept, key=lambda answer: (-counts[answer], answer))


def build_answer_vocab(annotations: Sequence[Mapping[str, Any]], min_count: int) -> list[str]:
  """Answers that are the (normalised) `multiple_choice_answer` of at least
  `min_count` questions, most frequent first (ties alphabetical). On VQA v2,
  min_count 9 gives the usual 3129 answers (bottom-up-attention counted train
  and val questions)."""
  return frequent_answers((normalize_answer(a['multiple_choice_answer']) for a in annotations),
                          min_count)


def soft_targets(raw_answers: Sequence[str], answer_to_label: Mapping[str, int]
                 ) -> tuple[list[int], list[float]]:
  """(labels, scores) of the in-vocabulary answers among the raw annotator answers."""
  counts = collections.Counter(normalize_answer(answer) for answer in raw_answers)
  labels = sorted(answer_to_label[a] for a in counts if a in answer_to_label)
  by_label = {answer_to_label[a]: answer_score(c) for a, c in counts.items()
              if a in answer_to_label}
  return labels, [by_label[label] for label in labels]


def answer_vocab(builder: tfds.core.DatasetBuilder | str,
                 data_dir: str | os.PathLike[str] | None = None) -> list[str]:
  """The answer vocabulary (`answers.txt`) stored with a vqa table (builder or
  TFDS name); line i is answer label i."""
  if isinstance(builder, str):
    builder = tfds.builder(builder, data_dir=data_dir)
  return (paths.path(builder.data_dir) / ANSWERS_FILE).read_text(encoding='utf-8').splitlines()


# ---------------------------------------------------------------------------
# Builders.


class ImageIndex:
  """Image id -> row of an images table (read through `read_image_ids`)."""

  def __init__(self, images: str, data_dir: str | os.PathLike[str] | None, match: str):
    self.images = images
    self.match = match
    self.image_ids = features_builder.read_image_ids(images, data_dir)
    self.rows: dict[str | int, int] = {}
    for row, image_id in enumerate(self.image_ids):
      key = formats.image_key(image_id, match)
      if key in self.rows:
        raise ValueError(f'images table {images}: ids {self.image_ids[self.rows[key]]!r} and '
                         f'{image_id!r} both match {key!r}; use match=\'exact\'')
      self.rows[key] = row

  def lookup(self, image_id: Any, where: str) -> tuple[int, str]:
    """(row, the table's image id) of `image_id`; a `FormatError` if it is absent."""
    row = self.rows.get(formats.image_key(image_id, self.match))
    if row is None:
      raise formats.FormatError(where, f'missing image: {image_id!r} is not in the images '
                                f'table {self.images}', kind='missing image')
    return row, self.image_ids[row]


@dataclasses.dataclass(eq=False, kw_only=True)
class TextConfig(tfds.core.BuilderConfig):
  """A text table and the images table it refers to.

  Attributes:
    images: TFDS name of the images table ('dataset/config').
    images_data_dir: where that table lives; None: this builder's data_dir.
    files: annotation files by role, relative to the manual dir or absolute;
      empty: the builder's standard file names.
    match: how ids are matched to the table's ('number' or 'exact').
    on_error: 'raise', or 'skip' and count malformed entries.
    examples_per_shard: examples per ArrayRecord shard.
    caption_source: COCO captions only: 'karpathy' (`dataset_coco.json`) or
      'official' (`captions_{train,val}2014.json`).
    restval_to_train: Karpathy only: put 'restval' images in train (standard);
      otherwise they form a split 'restval'.
    splits: VQA and GQA: the splits to build (VQA: 'train', 'validation',
      'test'; GQA: `Gqa.SPLITS`).
    min_answer_count: VQA and GQA: an answer enters the vocabulary when it is
      the (VQA: multiple-choice) answer of at least this many questions.
    answer_vocab_splits: VQA and GQA: the splits whose answers are counted.
  """
  images: str = 'lxmert_tsv/coco'
  images_data_dir: str | None = None
  files: tuple[tuple[str, str], ...] = ()
  match: str = 'number'
  on_error: str = 'raise'
  examples_per_shard: int = 100_000
  caption_source: str = 'karpathy'
  restval_to_train: bool = True
  splits: tuple[str, ...] = ('train', 'validation')
  min_answer_count: int = 9
  answer_vocab_splits: tuple[str, ...] = ('train',)


CAPTION_FEATURES = dict(caption_id=np.int64, text=tfds.features.Text(), image_index=np.int64,
                        image_id=tfds.features.Text())


class TextTableBuilder(features_builder.SideFilesBuilder, abc.ABC):
  """Base of the text-table builders: parse files, map images, write shards."""
  VERSION = tfds.core.Version('1.0.0')
  FEATURES: dict[str, Any]
  DEFAULT_FILES: dict[str, str]
  TEXT_FIELD = 'text'  # the feature that holds the sentence
  # TextConfig fields whose default differs for this builder (the command line's too).
  CONFIG_DEFAULTS: dict[str, Any] = {}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Place the annotation files in the manual dir
(`--manual_dir`, default `<data_dir>/downloads/manual/`) under their standard
names, or name them in the config's `files`; build the images table first."""

  def _info(self) -> tfds.core.DatasetInfo:
    return features_builder.LocalDatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict(self.FEATURES),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def build_settings(self) -> dict[str, Any]:
    return features_builder.config_settings(self.builder_config, ('examples_per_shard',))

  @abc.abstractmethod
  def _split_examples(self, path: Callable[[str], str], images: ImageIndex,
                      report: formats.ErrorReport) -> dict[str, list[dict[str, Any]]]:
    """Examples per split; `path(role)` resolves an annotation file."""

  def _shard_iterators_per_split(self, dl_manager: tfds.download.DownloadManager
                                 ) -> dict[str, list[Callable[[], Iterator[Any]]]]:
    config = self.builder_config
    files = {**self.DEFAULT_FILES, **dict(config.files)}
    unknown = sorted(set(files) - set(self.DEFAULT_FILES))
    if unknown:
      raise ValueError(f'{self.name}: unknown file roles {unknown}; known: '
                       f'{sorted(self.DEFAULT_FILES)}')
    manual_dir = self._manual_dir(dl_manager)
    paths = {}

    def path(role: str) -> str:
      paths[role] = features_builder.resolve_paths([files[role]], manual_dir)[0]
      return paths[role]

    images = ImageIndex(config.images, config.images_data_dir or self.data_dir_root,
                        config.match)
    self.report = report = formats.ErrorReport(config.on_error,
                                               source=f'{self.name}/{config.name}')
    splits = self._split_examples(path, images, report)
    report.log()
    self.info.metadata.update({
        features_builder.SOURCES_KEY: paths,
        features_builder.IMAGES_FINGERPRINT:
            features_builder.image_ids_fingerprint(images.image_ids)})
    step = config.examples_per_shard
    shards = {}
    for split, examples in splits.items():
      if not examples:
        raise ValueError(f'{self.name}/{config.name}: split {split!r} has no examples '
                         f'({len(report.skipped)} skipped in all, by reason: '
                         f'{report.to_dict()["by_reason"]})')
      shards[split] = [functools.partial(_keyed, examples[start:start + step], start)
                       for start in range(0, len(examples), step)]
    return shards

  def _add(self, examples: list[dict[str, Any]], report: formats.ErrorReport, where: str,
           image_id: Any, images: ImageIndex, text: str, **fields: Any) -> None:
    """Appends one example with its image row, or hands the error to `report`."""
    try:
      if not isinstance(text, str) or not text.strip():
        raise formats.FormatError(where, f'empty text: {text!r}', kind='empty text')
      image_index, table_id = images.lookup(image_id, where)
    except formats.FormatError as e:
      report.handle(e)
      return
    examples.append(dict(fields, image_index=image_index, image_id=table_id,
                         **{self.TEXT_FIELD: text.strip()}))


def _keyed(examples: Sequence[dict[str, Any]], first: int) -> Iterator[tuple[int, dict[str, Any]]]:
  return enumerate(examples, start=first)


def _load_json(path: str) -> Any:
  try:
    return json.loads(paths.path(path).read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e


def _field(path: str, entry: Mapping[str, Any], name: str, what: str) -> Any:
  if name not in entry:
    raise formats.FormatError(path, f'{what}: missing field {name!r} (has {sorted(entry)})',
                              kind='missing field')
  return entry[name]


class CocoCaptions(TextTableBuilder):
  """COCO captions with image rows: official split files or Karpathy's split."""
  FEATURES = CAPTION_FEATURES
  DEFAULT_FILES = {'karpathy': 'dataset_coco.json', 'train': 'captions_train2014.json',
                   'validation': 'captions_val2014.json'}
  KARPATHY_SPLITS = {'train': 'train', 'restval': 'train', 'val': 'validation', 'test': 'test'}
  BUILDER_CONFIGS = [
      TextConfig(name='karpathy', description="Karpathy's split: train (+ restval), "
                 'validation and test (the retrieval split)'),
      TextConfig(name='official', caption_source='official',
                 description='captions_train2014 / captions_val2014'),
  ]

  def _split_examples(self, path, images, report):
    source = self.builder_config.caption_source
    if source == 'karpathy':
      return self._karpathy(path('karpathy'), images, report)
    if source == 'official':
      return {split: self._official(path(split), images, report)
              for split in ('train', 'validation')}
    raise ValueError(f"coco_captions: caption_source must be 'karpathy' or 'official', "
                     f'got {source!r}')

  def _official(self, path: str, images: ImageIndex, report: formats.ErrorReport
                ) -> list[dict[str, Any]]:
    data = _load_json(path)
    file_stems = {image['id']: os.path.splitext(image['file_name'])[0]
                  for image in data.get('images', [])}
    examples = []
    for annotation in _field(path, data, 'annotations', 'captions file'):
      where = f'{path}: caption {annotation.get("id")}'
      image_id = _field(where, annotation, 'image_id', 'caption')
      if images.match == 'exact':
        image_id = file_stems.get(image_id, image_id)
      self._add(examples, report, where, image_id, images,
                _field(where, annotation, 'caption', 'caption'),
                caption_id=_field(where, annotation, 'id', 'caption'))
    return examples

  def _karpathy(self, path: str, images: ImageIndex, report: formats.ErrorReport
                ) -> dict[str, list[dict[str, Any]]]:
    data = _load_json(path)
    splits = collections.defaultdict(list)
    for entry in _field(path, data, 'images', 'Karpathy file'):
      where = f'{path}: image {entry.get("cocoid", entry.get("filename"))}'
      split = _field(where, entry, 'split', 'image')
      if split not in self.KARPATHY_SPLITS:
        raise formats.FormatError(where, f'unknown split {split!r}; expected one of '
                                  f'{sorted(self.KARPATHY_SPLITS)}', kind='unknown split')
      if split == 'restval' and not self.builder_config.restval_to_train:
        split_name = 'restval'
      else:
        split_name = self.KARPATHY_SPLITS[split]
      # COCO's entries carry `cocoid`; Flickr30k's (`dataset_flickr30k.json`, the
      # same layout) only `filename` ('1000092795.jpg'), whose stem is the image id.
      image_id = (entry['cocoid'] if images.match == 'number' and 'cocoid' in entry
                  else os.path.splitext(_field(where, entry, 'filename', 'image'))[0])
      for sentence in _field(where, entry, 'sentences', 'image'):
        self._add(splits[split_name], report, f'{where} sentence {sentence.get("sentid")}',
                  image_id, images, _field(where, sentence, 'raw', 'sentence'),
                  caption_id=_field(where, sentence, 'sentid', 'sentence'))
    return dict(splits)


class VgRegionDescriptions(TextTableBuilder):
  """Visual Genome region descriptions as captions of their image (pretraining text)."""
  FEATURES = CAPTION_FEATURES
  DEFAULT_FILES = {'regions': 'region_descriptions.json'}
  BUILDER_CONFIGS = [TextConfig(name='regions', images='lxmert_tsv/vg_gqa')]

  def _split_examples(self, path, images, report):
    regions_path = path('regions')
    examples = []
    for entry in _load_json(regions_path):
      for region in _field(regions_path, entry, 'regions', 'image entry'):
        where = f'{regions_path}: region {region.get("region_id")}'
        self._add(examples, report, where, _field(where, region, 'image_id', 'region'),
                  images, _field(where, region, 'phrase', 'region'),
                  caption_id=_field(where, region, 'region_id', 'region'))
    return {'train': examples}


class VqaV2(TextTableBuilder):
  """VQA v2 questions with image rows, raw answers and soft answer targets."""
  FEATURES = dict(
      question_id=np.int64, question=tfds.features.Text(), image_index=np.int64,
      image_id=tfds.features.Text(), answers=tfds.features.Sequence(tfds.features.Text()),
      answer_labels=tfds.features.Sequence(np.int32),
      answer_scores=tfds.features.Sequence(np.float32))
  TEXT_FIELD = 'question'
  DEFAULT_FILES = {
      'train_questions': 'v2_OpenEnded_mscoco_train2014_questions.json',
      'train_annotations': 'v2_mscoco_train2014_annotations.json',
      'validation_questions': 'v2_OpenEnded_mscoco_val2014_questions.json',
      'validation_annotations': 'v2_mscoco_val2014_annotations.json',
      'test_questions': 'v2_OpenEnded_mscoco_test2015_questions.json',
  }
  BUILDER_CONFIGS = [TextConfig(name='vqa')]

  def _split_examples(self, path, images, report):
    config = self.builder_config
    unknown = sorted(set(config.splits + config.answer_vocab_splits) -
                     {'train', 'validation', 'test'})
    if unknown or 'test' in config.answer_vocab_splits:
      raise ValueError(f'vqa_v2: splits must be train/validation/test and the answer '
                       f'vocabulary can only come from train/validation; got {unknown or "test"}')
    annotations = {split: self._annotations(path(f'{split}_annotations'))
                   for split in set(config.splits + config.answer_vocab_splits) - {'test'}}
    vocab = build_answer_vocab(
        [a for split in config.answer_vocab_splits for a in annotations[split].values()],
        config.min_answer_count)
    if not vocab:
      raise ValueError(f'vqa_v2: no answer occurs {config.min_answer_count} times in '
                       f'{config.answer_vocab_splits}; lower min_answer_count')
    self.side_files[ANSWERS_FILE] = ''.join(f'{answer}\n' for answer in vocab)
    answer_to_label = {answer: label for label, answer in enumerate(vocab)}
    return {split: self._questions(path(f'{split}_questions'), annotations.get(split),
                                   answer_to_label, images, report)
            for split in config.splits}

  def _annotations(self, path: str) -> dict[int, Mapping[str, Any]]:
    by_question = {}
    for annotation in _field(path, _load_json(path), 'annotations', 'annotations file'):
      where = f'{path}: question {annotation.get("question_id")}'
      for name in ('question_id', 'answers', 'multiple_choice_answer'):
        _field(where, annotation, name, 'annotation')
      by_question[annotation['question_id']] = annotation
    return by_question

  def _questions(self, path: str, annotations: Mapping[int, Mapping[str, Any]] | None,
                 answer_to_label: Mapping[str, int], images: ImageIndex,
                 report: formats.ErrorReport) -> list[dict[str, Any]]:
    examples = []
    questions = _field(path, _load_json(path), 'questions', 'questions file')
    asked = set()
    for question in questions:
      question_id = _field(path, question, 'question_id', 'question')
      where = f'{path}: question {question_id}'
      asked.add(question_id)
      raw_answers, labels, scores = [], [], []
      if annotations is not None:
        if question_id not in annotations:
          report.handle(formats.FormatError(where, 'missing annotation: no answers for it in '
                                            'the annotations file', kind='missing annotation'))
          continue
        raw_answers = [_field(where, a, 'answer', 'answer')
                       for a in annotations[question_id]['answers']]
        labels, scores = soft_targets(raw_answers, answer_to_label)
      self._add(examples, report, where, _field(where, question, 'image_id', 'question'),
                images, _field(where, question, 'question', 'question'),
                question_id=question_id, answers=raw_answers, answer_labels=labels,
                answer_scores=scores)
    if annotations is not None:
      for question_id in sorted(annotations.keys() - asked):
        report.handle(formats.FormatError(
            f'{path}: question {question_id}', 'missing question: the annotations file '
            'answers a question the questions file does not have', kind='missing question'))
    return examples


class _GqaQuestion(NamedTuple):
  where: str        # '<file>: question <id>', for errors
  question_id: str  # GQA's ids are text ('02930152'): kept as they are
  image_id: Any
  question: Any
  answer: str       # '' for a question without one (the submission questions)


class Gqa(TextTableBuilder):
  """GQA questions with image rows and their one answer (a target of score 1).

  Formats, told apart by each file's content:
    GQA's `{train,val,testdev}_balanced_questions.json` and
      `submission_all_questions.json`: a JSON object {question id: {imageId,
      question, answer, fullAnswer, types, ...}} (the submission file has no
      answers);
    LXMERT's `data/gqa/{train,valid,testdev,submit}.json`: a JSON list of
      {question_id, img_id, sent, label: {answer: 1.0}} (submit.json has no
      label); config 'lxmert' names these files.
  Split 'test' holds the submission questions, whose answers may be absent;
  every question of the other splits needs its one answer. The answer
  vocabulary holds the answers of `answer_vocab_splits` given at least
  `min_answer_count` times, as they are (GQA's evaluation compares strings
  exactly), most frequent first; an answer outside it gets no label, but its
  string is stored for the evaluator.
  """
  FEATURES = dict(
      question_id=tfds.features.Text(), question=tfds.features.Text(), image_index=np.int64,
      image_id=tfds.features.Text(), answer=tfds.features.Text(),
      answer_labels=tfds.features.Sequence(np.int32),
      answer_scores=tfds.features.Sequence(np.float32))
  TEXT_FIELD = 'question'
  SPLITS = ('train', 'validation', 'testdev', 'test')
  UNANSWERED_SPLIT = 'test'
  DEFAULT_FILES = {'train': 'train_balanced_questions.json',
                   'validation': 'val_balanced_questions.json',
                   'testdev': 'testdev_balanced_questions.json',
                   'test': 'submission_all_questions.json'}
  LXMERT_FILES = (('train', 'train.json'), ('validation', 'valid.json'),
                  ('testdev', 'testdev.json'), ('test', 'submit.json'))
  # GQA's image ids are text ('2354786', 'n161313'), as LXMERT's GQA TSVs store
  # them: matched exactly. Every answer counts (GQA has no annotator noise).
  CONFIG_DEFAULTS = dict(match='exact', splits=SPLITS, min_answer_count=1)
  BUILDER_CONFIGS = [
      # The images: an LXMERT-TSV table of vg_gqa_obj36.tsv and gqa_testdev_obj36.tsv.
      TextConfig(name='balanced', images='lxmert_tsv/gqa', description="GQA's balanced "
                 'questions and the submission questions', **CONFIG_DEFAULTS),
      TextConfig(name='lxmert', images='lxmert_tsv/gqa', files=LXMERT_FILES,
                 description="LXMERT's data/gqa json files", **CONFIG_DEFAULTS),
  ]

  def _split_examples(self, path, images, report):
    config = self.builder_config
    wanted = tuple(dict.fromkeys(config.splits + config.answer_vocab_splits))
    unknown = sorted(set(wanted) - set(self.SPLITS))
    if unknown or self.UNANSWERED_SPLIT in config.answer_vocab_splits:
      raise ValueError(f'gqa: splits must be among {self.SPLITS} and the answer vocabulary '
                       f'cannot come from {self.UNANSWERED_SPLIT!r}; got '
                       f'{unknown or config.answer_vocab_splits}')
    questions = {split: self._questions(path(split), split, report) for split in wanted}
    vocab = frequent_answers((q.answer for split in config.answer_vocab_splits
                              for q in questions[split]), config.min_answer_count)
    if not vocab:
      raise ValueError(f'gqa: no answer occurs {config.min_answer_count} times in '
                       f'{config.answer_vocab_splits}; lower min_answer_count')
    self.side_files[ANSWERS_FILE] = ''.join(f'{answer}\n' for answer in vocab)
    answer_to_label = {answer: label for label, answer in enumerate(vocab)}
    splits = {}
    for split in config.splits:
      splits[split] = []
      for q in questions[split]:
        labels = [answer_to_label[q.answer]] if q.answer in answer_to_label else []
        self._add(splits[split], report, q.where, q.image_id, images, q.question,
                  question_id=q.question_id, answer=q.answer, answer_labels=labels,
                  answer_scores=[1.0] * len(labels))
    return splits

  def _questions(self, path: str, split: str, report: formats.ErrorReport
                 ) -> list[_GqaQuestion]:
    """The questions of one file, in its order; problems of a question (no or a
    malformed answer, a repeated id) go to `report`."""
    data = _load_json(path)
    if isinstance(data, dict):
      parsed = (self._gqa_question(path, question_id, entry)
                for question_id, entry in data.items())
    elif isinstance(data, list):
      parsed = (self._lxmert_question(path, entry) for entry in data)
    else:
      raise ValueError(f"{path}: expected GQA's questions (a JSON object id -> question) or "
                       f"LXMERT's (a JSON list of questions), got {type(data).__name__}")
    questions, seen = [], set()
    for where, question_id, image_id, question, answer in parsed:
      try:
        if question_id in seen:
          raise formats.FormatError(where, 'duplicate question id', kind='duplicate question')
        if answer is None and split != self.UNANSWERED_SPLIT:
          raise formats.FormatError(where, f'missing answer: every question of split '
                                    f'{split!r} needs one', kind='missing answer')
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
          raise formats.FormatError(where, f'bad answer: {answer!r}', kind='bad answer')
      except formats.FormatError as e:
        report.handle(e)
        continue
      seen.add(question_id)
      questions.append(_GqaQuestion(where, question_id, image_id, question, answer or ''))
    return questions

  @staticmethod
  def _gqa_question(path: str, question_id: Any, entry: Any
                    ) -> tuple[str, str, Any, Any, Any]:
    where = f'{path}: question {question_id}'
    if not isinstance(entry, Mapping):
      raise formats.FormatError(where, f'expected a question object, got '
                                f'{type(entry).__name__}', kind='malformed question')
    return (where, str(question_id), _field(where, entry, 'imageId', 'question'),
            _field(where, entry, 'question', 'question'), entry.get('answer'))

  @staticmethod
  def _lxmert_question(path: str, entry: Any) -> tuple[str, str, Any, Any, Any]:
    if not isinstance(entry, Mapping):
      raise formats.FormatError(path, f'expected question objects, got '
                                f'{type(entry).__name__}', kind='malformed question')
    question_id = str(_field(path, entry, 'question_id', 'question'))
    where = f'{path}: question {question_id}'
    label, answer = entry.get('label'), None
    if label is not None:
      # GQA has one answer per question: LXMERT writes {answer: 1.0}.
      if not isinstance(label, Mapping) or len(label) != 1:
        raise formats.FormatError(where, f'label must be {{answer: 1.0}}, one answer, got '
                                  f'{label!r}', kind='bad label')
      (answer,) = label
    return (where, question_id, _field(where, entry, 'img_id', 'question'),
            _field(where, entry, 'sent', 'question'), answer)


class SnliVe(TextTableBuilder):
  """SNLI-VE: statements about Flickr30k images with their 3-way gold label.

  Files `snli_ve_{train,dev,test}.jsonl` (dev is split 'validation'), one JSON
  object a line with `Flickr30K_ID` (the image), `sentence2` (the statement),
  `gold_label` (entailment / neutral / contradiction) and, in the released
  files, `pairID` (the example's id; a line without one gets '<file>:<line>').
  A gold_label of '-' is SNLI's mark of no annotator consensus: such lines are
  skipped in either on_error mode and counted in the ingest report as 'no
  consensus'. `label` indexes `world.ENTAILMENT_LABELS`.
  """
  FEATURES = dict(pair_id=tfds.features.Text(), text=tfds.features.Text(),
                  image_index=np.int64, image_id=tfds.features.Text(), label=np.int32)
  SPLITS = ('train', 'validation', 'test')
  DEFAULT_FILES = {'train': 'snli_ve_train.jsonl', 'validation': 'snli_ve_dev.jsonl',
                   'test': 'snli_ve_test.jsonl'}
  NO_CONSENSUS = '-'
  CONFIG_DEFAULTS = dict(splits=SPLITS)
  BUILDER_CONFIGS = [TextConfig(name='flickr30k', images='lxmert_tsv/flickr30k',
                                description="SNLI-VE's train, dev and test", **CONFIG_DEFAULTS)]

  def _split_examples(self, path, images, report):
    unknown = sorted(set(self.builder_config.splits) - set(self.SPLITS))
    if unknown:
      raise ValueError(f'snli_ve: splits must be among {self.SPLITS}, got {unknown}')
    return {split: self._pairs(path(split), images, report)
            for split in self.builder_config.splits}

  def _pairs(self, path: str, images: ImageIndex, report: formats.ErrorReport
             ) -> list[dict[str, Any]]:
    """The labelled pairs of one jsonl file, in its order."""
    examples, seen = [], set()
    for number, where, line in _jsonl_lines(path):
      try:
        entry = _json_line(where, line)
        pair_id = str(entry.get('pairID', f'{os.path.basename(path)}:{number}'))
        where = f'{where}: pair {pair_id}'
        gold_label = _field(where, entry, 'gold_label', 'pair')
        if gold_label == self.NO_CONSENSUS:
          report.skip(formats.FormatError(where, "gold_label '-': the annotators did not "
                                          'agree', kind='no consensus'))
          continue
        if gold_label not in world_lib.ENTAILMENT_LABELS:
          raise formats.FormatError(where, f'bad gold_label {gold_label!r}; expected one of '
                                    f"{world_lib.ENTAILMENT_LABELS} or '-'", kind='bad label')
        if pair_id in seen:
          raise formats.FormatError(where, 'duplicate pair id', kind='duplicate pair')
        image_id = _field(where, entry, 'Flickr30K_ID', 'pair')
        sentence = _field(where, entry, 'sentence2', 'pair')
      except formats.FormatError as e:
        report.handle(e)
        continue
      seen.add(pair_id)
      self._add(examples, report, where, image_id, images, sentence, pair_id=pair_id,
                label=world_lib.ENTAILMENT_LABELS.index(gold_label))
    return examples


@dataclasses.dataclass(eq=False, kw_only=True)
class RefexpConfig(TextConfig):
  """A TextConfig that may read pickles.

  Attributes:
    trust_pickle: read `refs(unc).p`/`refs(umd).p` (pickles could run code when
      loaded; even trusted, they are read by an unpickler that loads no class).
      It changes what may be read, not the table: not a build setting.
  """
  trust_pickle: bool = False


class Refcoco(TextTableBuilder):
  """RefCOCO, RefCOCO+ and RefCOCOg referring expressions, one row per sentence.

  Files (roles): `refs`, the refer toolkit's `refs(unc).p` (RefCOCO, RefCOCO+)
  or `refs(umd).p` (RefCOCOg), a pickle read only with trust_pickle, or its
  JSON conversion (the same list of ref dicts; the format is read from the
  content, JSON needs no trust); `instances`, COCO's `instances.json` (the
  annotations' `bbox` [x, y, w, h] in pixels). A ref is {ref_id, ann_id,
  image_id, split, sentences: [{sent, sent_id, ...}], ...}.

  Rows: ref_id, sent_id, ann_id, text (the sentence), image_index, image_id,
  target_box float32 [4] (x1, y1, x2, y2 = x, y, x + w, y + h: pixels, so the
  images table must store pixel boxes, as lxmert_tsv does and uniter_lmdb with
  --image_sizes). Splits: the refs' own, 'val' stored as 'validation': unc
  train, validation, testA, testB; umd train, validation, test (`splits`, when
  given, keeps only those). Errors name the file, the ref's position in the
  list and its ref_id.
  """
  FEATURES = dict(ref_id=np.int64, sent_id=np.int64, ann_id=np.int64,
                  text=tfds.features.Text(), image_index=np.int64, image_id=tfds.features.Text(),
                  target_box=tfds.features.Tensor(shape=(4,), dtype=np.float32))
  DEFAULT_FILES = {'refs': 'refs(unc).p', 'instances': 'instances.json'}
  SPLIT_NAMES = {'train': 'train', 'val': 'validation', 'testA': 'testA', 'testB': 'testB',
                 'test': 'test'}
  CONFIG_CLASS = RefexpConfig
  CONFIG_DEFAULTS = dict(splits=())  # (): every split the refs have
  # No predefined configs: each dataset (RefCOCO, RefCOCO+, RefCOCOg) is a config
  # the user names, with its refs file (`--file refs=refcocog/refs(umd).p`).

  def build_settings(self) -> dict[str, Any]:
    return features_builder.config_settings(self.builder_config,
                                            ('examples_per_shard', 'trust_pickle'))

  def _split_examples(self, path, images, report):
    refs_path = path('refs')
    refs = self._read_refs(refs_path)
    boxes = self._annotation_boxes(path('instances'))
    wanted = set(self.builder_config.splits)
    unknown = sorted(wanted - set(self.SPLIT_NAMES.values()))
    if unknown:
      raise ValueError(f'refcoco: splits must be among {sorted(set(self.SPLIT_NAMES.values()))}, '
                       f'got {unknown}')
    splits: dict[str, list[dict[str, Any]]] = {}
    for number, ref in enumerate(refs):
      where = f'{refs_path}: ref #{number}'
      try:
        if not isinstance(ref, dict):
          raise formats.FormatError(where, f'expected a dict, got {type(ref).__name__}',
                                    kind='malformed ref')
        ref_id = _field(where, ref, 'ref_id', 'ref')
        where = f'{where} (ref_id {ref_id})'
        split = self.SPLIT_NAMES.get(_field(where, ref, 'split', 'ref'))
        if split is None:
          raise formats.FormatError(where, f'unknown split {ref["split"]!r}; expected one of '
                                    f'{sorted(self.SPLIT_NAMES)}', kind='bad split')
        ann_id = _field(where, ref, 'ann_id', 'ref')
        if ann_id not in boxes:
          raise formats.FormatError(where, f'ann_id {ann_id!r} is not in the instances file',
                                    kind='missing annotation')
        box = self._box(where, boxes[ann_id])
        image_id = _field(where, ref, 'image_id', 'ref')
        sentences = _field(where, ref, 'sentences', 'ref')
        if not isinstance(sentences, list) or not sentences:
          raise formats.FormatError(where, 'sentences must be a non-empty list',
                                    kind='malformed ref')
        for sentence in sentences:
          if not isinstance(sentence, dict):
            raise formats.FormatError(where, 'each sentence must be a dict {sent, sent_id}',
                                      kind='malformed ref')
          _field(where, sentence, 'sent', 'sentence')
          _field(where, sentence, 'sent_id', 'sentence')
      except formats.FormatError as e:
        report.handle(e)
        continue
      if wanted and split not in wanted:
        continue
      for sentence in sentences:
        self._add(splits.setdefault(split, []), report,
                  f'{where}: sent_id {sentence["sent_id"]}', image_id, images, sentence['sent'],
                  ref_id=int(ref_id), sent_id=int(sentence['sent_id']), ann_id=int(ann_id),
                  target_box=box)
    return splits

  def _read_refs(self, path: str) -> list[Any]:
    """The refs list of a pickle (trust_pickle only) or of its JSON conversion."""
    data = paths.path(path).read_bytes()
    if data.lstrip()[:1] in (b'[', b'{'):
      try:
        refs = json.loads(data)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from e
    else:
      if not self.builder_config.trust_pickle:
        raise formats.pickle_refusal(f'{path} (a refs pickle; pass --trust_pickle, or use '
                                     'its JSON conversion)')
      try:
        refs = formats.PlainUnpickler(io.BytesIO(data), path).load()
      except formats.FormatError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f'{path}: not a readable refs pickle ({type(e).__name__}: {e})') from e
    if not isinstance(refs, list):
      raise ValueError(f'{path}: expected a list of refs, got {type(refs).__name__}')
    return refs

  @staticmethod
  def _annotation_boxes(path: str) -> dict[Any, Any]:
    """annotation id -> its `bbox` as stored ([x, y, w, h]), from COCO's instances.json."""
    data = _load_json(path)
    annotations = data.get('annotations') if isinstance(data, dict) else None
    if not isinstance(annotations, list):
      raise ValueError(f'{path}: expected COCO instances {{"annotations": [...]}}')
    boxes = {}
    for number, annotation in enumerate(annotations):
      where = f'{path}: annotation #{number}'
      if not isinstance(annotation, dict):
        raise formats.FormatError(where, 'expected a dict', kind='malformed annotation')
      boxes[_field(where, annotation, 'id', 'annotation')] = annotation.get('bbox')
    return boxes

  @staticmethod
  def _box(where: str, bbox: Any) -> np.ndarray:
    """COCO's [x, y, w, h] -> float32 [x1, y1, x2, y2]; a FormatError when it is not a box."""
    try:
      x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
      raise formats.FormatError(where, f'bad bbox {bbox!r}; expected [x, y, w, h]',
                                kind='bad box') from None
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
      raise formats.FormatError(where, f'bad bbox {bbox!r}: width and height must be positive',
                                kind='bad box')
    return np.array([x, y, x + w, y + h], np.float32)


def _jsonl_lines(path: str) -> Iterator[tuple[int, str, str]]:
  """(line number, where: '<path>: line N', the line) of each non-blank line."""
  with paths.path(path).open(encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield number, f'{path}: line {number}', line


def _json_line(where: str, line: str) -> dict[str, Any]:
  """One jsonl line as a JSON object; a `FormatError` naming `where` otherwise."""
  try:
    entry = json.loads(line)
  except json.JSONDecodeError as e:
    raise formats.FormatError(where, f'not valid JSON ({e})', kind='malformed line') from None
  if not isinstance(entry, dict):
    raise formats.FormatError(where, f'expected a JSON object, got {type(entry).__name__}',
                              kind='malformed line')
  return entry


class Nlvr2(TextTableBuilder):
  """NLVR2: a sentence about a pair of images, True or False.

  Formats, told apart by each file's content:
    lil-lab's `{train,dev,test1,test2}.json` (JSON lines despite the name): one
      object a line with `identifier` (`<split>-<set>-<pair>-<sentence>`),
      `sentence`, `label` ("True"/"False"), `left_url`, `right_url`, ...; the
      images are `<split>-<set>-<pair>-img0` (left) and `-img1` (right): the
      identifier less its sentence field, as lil-lab names the image files;
    LXMERT's `data/nlvr2/{train,valid,test}.json`: one JSON list of
      {identifier, img0, img1, label 0/1, sent, uid}; config 'lxmert' names
      these files.
  Splits: train, validation (dev), test (test1, "test-P") and test2 ("test-U");
  lil-lab's test files have labels, and every example needs one. Image ids are
  matched exactly (`match='exact'`). Rows: identifier (for consistency and the
  prediction file), text, left/right_image_index, left/right_image_id, label
  (1 = True). Errors name the file, the line (a JSON list: the entry) and the
  identifier.
  """
  FEATURES = dict(identifier=tfds.features.Text(), text=tfds.features.Text(),
                  left_image_index=np.int64, right_image_index=np.int64,
                  left_image_id=tfds.features.Text(), right_image_id=tfds.features.Text(),
                  label=np.int32)
  SPLITS = ('train', 'validation', 'test', 'test2')
  DEFAULT_FILES = {'train': 'train.json', 'validation': 'dev.json', 'test': 'test1.json',
                   'test2': 'test2.json'}
  LXMERT_FILES = (('train', 'train.json'), ('validation', 'valid.json'), ('test', 'test.json'))
  LABELS = ('False', 'True')  # label id -> lil-lab's string
  CONFIG_DEFAULTS = dict(match='exact', splits=('train', 'validation', 'test'))
  BUILDER_CONFIGS = [
      # The images: an LXMERT-TSV table of LXMERT's nlvr2 TSVs (ids `dev-850-0-img0`).
      TextConfig(name='lil_lab', images='lxmert_tsv/nlvr2',
                 description="lil-lab's train, dev and test1 files", **CONFIG_DEFAULTS),
      TextConfig(name='lxmert', images='lxmert_tsv/nlvr2', files=LXMERT_FILES,
                 description="LXMERT's data/nlvr2 json files", **CONFIG_DEFAULTS),
  ]

  def _split_examples(self, path, images, report):
    unknown = sorted(set(self.builder_config.splits) - set(self.SPLITS))
    if unknown:
      raise ValueError(f'nlvr2: splits must be among {self.SPLITS}, got {unknown}')
    return {split: self._pairs(path(split), images, report)
            for split in self.builder_config.splits}

  def _pairs(self, path: str, images: ImageIndex, report: formats.ErrorReport
             ) -> list[dict[str, Any]]:
    """The labelled pairs of one file (either format), in its order."""
    text = paths.path(path).read_text(encoding='utf-8')
    if text.lstrip().startswith('['):
      try:
        entries = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
      parsed = ((f'{path}: entry {k}', entry, self._lxmert_pair)
                for k, entry in enumerate(entries))
    else:
      parsed = ((f'{path}: line {number}', line, self._lil_lab_pair)
                for number, line in enumerate(text.splitlines(), start=1) if line.strip())
    examples, seen = [], set()
    for where, entry, parse in parsed:
      try:
        identifier, sentence, label, image_ids, where = parse(where, entry)
        if identifier in seen:
          raise formats.FormatError(where, 'duplicate identifier', kind='duplicate pair')
        if not isinstance(sentence, str) or not sentence.strip():
          raise formats.FormatError(where, f'empty sentence: {sentence!r}', kind='empty text')
        (left_index, left_id), (right_index, right_id) = (images.lookup(i, where)
                                                          for i in image_ids)
      except formats.FormatError as e:
        report.handle(e)
        continue
      seen.add(identifier)
      examples.append(dict(identifier=identifier, text=sentence.strip(),
                           left_image_index=left_index, right_image_index=right_index,
                           left_image_id=left_id, right_image_id=right_id, label=label))
    return examples

  def _lil_lab_pair(self, where: str, line: str) -> tuple[str, Any, int, tuple[str, str], str]:
    """(identifier, sentence, label id, (left, right) image ids, where) of a jsonl line."""
    entry = _json_line(where, line)
    identifier = str(_field(where, entry, 'identifier', 'example'))
    where = f'{where}: identifier {identifier}'
    fields = identifier.split('-')
    if len(fields) != 4:
      raise formats.FormatError(where, 'identifier is not <split>-<set>-<pair>-<sentence>',
                                kind='bad identifier')
    label = str(_field(where, entry, 'label', 'example'))
    if label.lower() not in ('true', 'false'):
      raise formats.FormatError(where, f"bad label {label!r}; expected 'True' or 'False'",
                                kind='bad label')
    images = '-'.join(fields[:3])
    return (identifier, _field(where, entry, 'sentence', 'example'),
            int(label.lower() == 'true'), (f'{images}-img0', f'{images}-img1'), where)

  def _lxmert_pair(self, where: str, entry: Any) -> tuple[str, Any, int, tuple[Any, Any], str]:
    """(identifier, sentence, label id, (left, right) image ids, where) of an
    LXMERT entry."""
    if not isinstance(entry, Mapping):
      raise formats.FormatError(where, f'expected an object, got {type(entry).__name__}',
                                kind='malformed line')
    identifier = str(_field(where, entry, 'identifier', 'example'))
    where = f'{where}: identifier {identifier}'
    label = _field(where, entry, 'label', 'example')
    if isinstance(label, bool) or label not in (0, 1):
      raise formats.FormatError(where, f'bad label {label!r}; expected 0 or 1', kind='bad label')
    return (identifier, _field(where, entry, 'sent', 'example'), int(label),
            (_field(where, entry, 'img0', 'example'), _field(where, entry, 'img1', 'example')),
            where)


class Vcr(TextTableBuilder):
  """VCR (Visual Commonsense Reasoning): a question about a movie still, four
  answers and four rationales, whose words refer to the image's objects.

  Files r2c's `{train,val,test}.jsonl` (val is split 'validation'), one JSON
  object a line with `annot_id`, `img_fn` (the image: the images table's id,
  matched exactly), `objects` (the class name of each of the image's objects),
  `question`, `answer_choices` [4] and `rationale_choices` [4] (token lists:
  a word is a string, an object reference a list of indices into `objects`,
  e.g. `["Why", "is", [0], "smiling", "?"]`), `answer_label` and
  `rationale_label` (0-3; the test file has none: stored as -1, and the
  evaluator then writes predictions without accuracies). The images table's
  regions must be the annotated objects first, in `objects` order (UNITER's
  `vcr_gt` features), since references index them. Rows: annot_id,
  image_index, image_id, question, answer_choices, rationale_choices and
  objects as JSON text (VCR's own structures), answer_label, rationale_label.
  Errors (a reference out of range of `objects` among them) name the file, the
  line and the annot_id.
  """
  FEATURES = dict(annot_id=tfds.features.Text(), image_index=np.int64,
                  image_id=tfds.features.Text(), question=tfds.features.Text(),
                  answer_choices=tfds.features.Text(), rationale_choices=tfds.features.Text(),
                  objects=tfds.features.Text(), answer_label=np.int32,
                  rationale_label=np.int32)
  SPLITS = ('train', 'validation', 'test')
  DEFAULT_FILES = {'train': 'train.jsonl', 'validation': 'val.jsonl', 'test': 'test.jsonl'}
  CHOICES = world_lib.VCR_CHOICES
  UNLABELLED = -1
  CONFIG_DEFAULTS = dict(match='exact', splits=SPLITS)
  BUILDER_CONFIGS = [TextConfig(name='vcr1', images='lxmert_tsv/vcr_gt',
                                description="VCR 1.0's train, val and test", **CONFIG_DEFAULTS)]

  def _split_examples(self, path, images, report):
    unknown = sorted(set(self.builder_config.splits) - set(self.SPLITS))
    if unknown:
      raise ValueError(f'vcr: splits must be among {self.SPLITS}, got {unknown}')
    return {split: self._examples(path(split), split, images, report)
            for split in self.builder_config.splits}

  def _examples(self, path: str, split: str, images: ImageIndex, report: formats.ErrorReport
                ) -> list[dict[str, Any]]:
    """The examples of one jsonl file, in its order."""
    examples, seen = [], set()
    for _, where, line in _jsonl_lines(path):
      try:
        entry = _json_line(where, line)
        annot_id = str(_field(where, entry, 'annot_id', 'example'))
        where = f'{where}: annot_id {annot_id}'
        if annot_id in seen:
          raise formats.FormatError(where, 'duplicate annot_id', kind='duplicate example')
        example = self._example(where, entry, split)
        image_index, image_id = images.lookup(_field(where, entry, 'img_fn', 'example'), where)
      except formats.FormatError as e:
        report.handle(e)
        continue
      seen.add(annot_id)
      examples.append(dict(example, annot_id=annot_id, image_index=image_index,
                           image_id=image_id))
    return examples

  def _example(self, where: str, entry: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The checked fields of one line (less annot_id and the image)."""
    objects = _field(where, entry, 'objects', 'example')
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
      raise formats.FormatError(where, f'objects must be a list of class names, got '
                                f'{objects!r}', kind='bad objects')
    question = _field(where, entry, 'question', 'example')
    self._check_tokens(where, 'question', question, len(objects))
    example = dict(question=json.dumps(question), objects=json.dumps(objects))
    for stage in ('answer', 'rationale'):
      choices = _field(where, entry, f'{stage}_choices', 'example')
      if not isinstance(choices, list) or len(choices) != self.CHOICES:
        raise formats.FormatError(where, f'{stage}_choices must be a list of {self.CHOICES} '
                                  f'token lists, got {choices!r}', kind='bad choices')
      for k, choice in enumerate(choices):
        self._check_tokens(where, f'{stage}_choices[{k}]', choice, len(objects))
      example[f'{stage}_choices'] = json.dumps(choices)
      example[f'{stage}_label'] = self._label(where, entry, f'{stage}_label', split)
    return example

  def _label(self, where: str, entry: Mapping[str, Any], name: str, split: str) -> int:
    """The label `name` in [0, CHOICES); UNLABELLED when the test file has none."""
    if name not in entry and split == 'test':
      return self.UNLABELLED
    label = _field(where, entry, name, 'example')
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.CHOICES:
      raise formats.FormatError(where, f'bad {name} {label!r}; expected 0 to {self.CHOICES - 1}',
                                kind='bad label')
    return label

  def _check_tokens(self, where: str, field: str, tokens: Any, num_objects: int) -> None:
    """A token list: a non-empty list of words and references (non-empty lists of
    indices into the `num_objects` objects)."""
    if not isinstance(tokens, list) or not tokens:
      raise formats.FormatError(where, f'{field} must be a non-empty token list, got '
                                f'{tokens!r}', kind='bad tokens')
    for token in tokens:
      if isinstance(token, str):
        continue
      if (not isinstance(token, list) or not token
          or any(isinstance(i, bool) or not isinstance(i, int) for i in token)):
        raise formats.FormatError(where, f'{field}: token {token!r} is neither a word nor a '
                                  'list of object indices', kind='bad tokens')
      outside = [i for i in token if not 0 <= i < num_objects]
      if outside:
        raise formats.FormatError(where, f'{field}: object reference {token!r} is out of '
                                  f'range of the {num_objects} objects', kind='bad reference')


BUILDERS = {'coco_captions': CocoCaptions, 'vg_region_descriptions': VgRegionDescriptions,
            'vqa_v2': VqaV2, 'gqa': Gqa, 'snli_ve': SnliVe, 'refcoco': Refcoco,
            'nlvr2': Nlvr2, 'vcr': Vcr}


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: build one text table against a built images table."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('dataset', choices=sorted(BUILDERS))
  parser.add_argument('--config', required=True,
                      help='karpathy|official (coco_captions), regions, vqa, or a new name')
  parser.add_argument('--images', required=True, help="images table, e.g. 'lxmert_tsv/coco'")
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--images_data_dir', default=None)
  parser.add_argument('--manual_dir', default=None)
  parser.add_argument('--file', action='append', default=[], metavar='ROLE=PATH',
                      help='an annotation file other than the standard name')
  parser.add_argument('--caption_source', choices=('karpathy', 'official'), default='karpathy')
  # None: the dataset's default (`CONFIG_DEFAULTS`, else TextConfig's).
  parser.add_argument('--match', choices=('number', 'exact'), default=None,
                      help="default: exact for gqa and vcr, else number")
  parser.add_argument('--on_error', choices=formats.ON_ERROR_CHOICES, default='raise')
  parser.add_argument('--splits', nargs='+', default=None,
                      help='default: train validation (gqa: train validation testdev test; '
                      'snli_ve, vcr: train validation test)')
  parser.add_argument('--min_answer_count', type=int, default=None,
                      help='default: 9 (gqa: 1)')
  parser.add_argument('--answer_vocab_splits', nargs='+', default=['train'])
  parser.add_argument('--trust_pickle', action='store_true',
                      help='refcoco: read refs(unc).p/refs(umd).p pickles (only files you '
                      'trust; the JSON conversions need no trust)')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild the table if one is built under this config name '
                      '(without it, one built from other settings is an error)')
  args = parser.parse_args(argv)
  builder_cls = BUILDERS[args.dataset]
  chosen = dict(match=args.match, splits=args.splits and tuple(args.splits),
                min_answer_count=args.min_answer_count)
  config_cls = getattr(builder_cls, 'CONFIG_CLASS', TextConfig)
  if args.trust_pickle:
    if not hasattr(config_cls, 'trust_pickle'):
      parser.error(f'--trust_pickle: {args.dataset} reads no pickles')
    chosen['trust_pickle'] = True
  config = config_cls(
      name=args.config, images=args.images, images_data_dir=args.images_data_dir,
      files=tuple(tuple(item.split('=', 1)) for item in args.file),
      caption_source=args.caption_source, on_error=args.on_error,
      answer_vocab_splits=tuple(args.answer_vocab_splits),
      **{**builder_cls.CONFIG_DEFAULTS, **{k: v for k, v in chosen.items() if v is not None}})
  builder = builder_cls(config=config, data_dir=args.data_dir)
  builder.download_and_prepare(
      download_config=features_builder.download_config(args.manual_dir, args.overwrite))
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  print(f'{builder.info.full_name}: {sizes} in {builder.data_dir}')


if __name__ == '__main__':
  main()
