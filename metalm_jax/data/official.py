"""The papers' real benchmarks, built from the official files you download yourself.

Five TFDS builders (array_record, readable without TensorFlow through
`datasets.data_source`) that read the files each benchmark's authors publish, from a
`manual_dir`; nothing is ever downloaded at run time:

  vqav2               VQA v2 (visualqa.org): train / validation [/ test_dev]
  ok_vqa              OK-VQA v1.1 (okvqa.allenai.org): train / validation (COCO val2014)
  coco_karpathy       COCO captions, Karpathy split: train (incl. restval) / validation / test
  nlvr2               NLVR2 (lil.nlp.cornell.edu/nlvr): train / validation (dev) / test (test1)
  flickr30k_karpathy  Flickr30k captions, Karpathy split: train / validation / test

All of them read one shared tree (COCO images serve three datasets), by default
`<data_dir>/downloads/manual/` (TFDS's convention), or the `manual_dir` given to
`datasets.prepare(name, data_dir, manual_dir=...)`:

  <manual_dir>/
    coco/train2014/COCO_train2014_000000xxxxxx.jpg    vqav2, ok_vqa, coco_karpathy
    coco/val2014/COCO_val2014_000000xxxxxx.jpg        vqav2, ok_vqa, coco_karpathy
    coco/test2015/COCO_test2015_000000xxxxxx.jpg      vqav2 test_dev only (optional)
    vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    vqav2/v2_mscoco_{train,val}2014_annotations.json
    vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json      (optional: test_dev split)
    okvqa/OpenEnded_mscoco_{train,val}2014_questions.json
    okvqa/mscoco_{train,val}2014_annotations.json
    karpathy/dataset_coco.json
    karpathy/dataset_flickr30k.json
    flickr30k/flickr30k-images/<flickr id>.jpg
    nlvr2/{train,dev,test1}.json                      JSON lines, from github.com/lil-lab/nlvr
    nlvr2/images/train/<directory>/train-<set>-<pair>-img{0,1}.png   (any depth below train/)
    nlvr2/images/{dev,test1}/<split>-<set>-<pair>-img{0,1}.png

A missing or incomplete tree raises `ManualFilesMissingError`, naming each missing file,
where to download it and where to put it (`instructions(name)` prints the same text).

Examples carry everything their evaluation needs:

  vqav2, ok_vqa (one example per question)
    image                   Image uint8 [H, W, 3] (JPEG)
    image_id, question_id   int64
    question                Text
    answers                 Sequence(Text): the 10 human answers (the VQA accuracy
                            min(#matches / 3, 1) averages over them); empty for test_dev
    answer_confidences      Sequence(Text): 'yes' / 'maybe' / 'no', aligned with answers
    multiple_choice_answer  Text: VQAv2's field; OK-VQA has none, so its most frequent
                            answer (ties: first seen); '' for test_dev
    question_type, answer_type  Text ('' where the files have none)
  coco_karpathy, flickr30k_karpathy (one example per image)
    image                   Image uint8 [H, W, 3] (JPEG)
    image_id                int64: COCO's `cocoid` / the Flickr photo id (file name stem)
    filename                Text: 'val2014/COCO_val2014_000000391895.jpg' / '1000092795.jpg'
    captions                Sequence(Text): every reference sentence ('raw'), usually 5
                            (a few COCO images have 6 or 7)
    karpathy_split          Text: 'train' / 'restval' / 'val' / 'test' as in the JSON
  nlvr2 (one example per sentence)
    image, image2           Image uint8 [H, W, 3] (PNG): the left (img0) and right (img1) image
    sentence                Text
    label                   int32: 1 for "True", 0 for "False"
    identifier              Text: 'dev-850-0-0' (its image files drop the last part)

Images: configs 'original' (default: the file's own bytes whenever they already are an RGB
image of the dataset's format; anything else, e.g. grayscale COCO JPEGs or NLVR2 '.png'
files that are really JPEGs, is converted to RGB and re-encoded) and 'short_side_384'
(also downscaled so the shorter side is 384; e.g. `datasets.prepare("vqav2/short_side_384",
...)`). One example per question stores its image again (VQAv2 train: ~5.4 questions per
image), so the resized config is the one to prefer for VQAv2 on a small disk.

This module must stay importable on its own: grain worker processes re-import it.
"""
import collections
import dataclasses
import io
import json
import os
from typing import Iterable

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

VISUALQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
OKVQA = "https://okvqa.allenai.org/static/data"
OKVQA_HOME = "https://okvqa.allenai.org/download.html"
COCO_ZIPS = "http://images.cocodataset.org/zips"
KARPATHY_ZIP = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
NLVR2_DATA = "https://raw.githubusercontent.com/lil-lab/nlvr/master/nlvr2/data"
NLVR2_IMAGES = ("the NLVR2 image request form linked from https://lil.nlp.cornell.edu/nlvr/ "
                "and https://github.com/lil-lab/nlvr/tree/master/nlvr2 (or "
                "nlvr2/util/download_images.py there)")
FLICKR30K_IMAGES = ("the Flickr30k request form at "
                    "https://shannon.cs.illinois.edu/DenotationGraph/ (flickr30k-images.tar.gz)")


@dataclasses.dataclass(frozen=True)
class ManualFile:
  """One file (or, ending in '/', one non-empty directory) under the manual dir."""
  path: str
  source: str  # where to get it, for the error message


class ManualFilesMissingError(FileNotFoundError):
  """Files a dataset reads from its manual dir are not there; the message says which."""


@dataclasses.dataclass
class ImageConfig(tfds.core.BuilderConfig):
  """How images are stored: as in the files, or downscaled to a shorter side of pixels."""
  short_side: int | None = None


IMAGE_CONFIGS = (
    ImageConfig(name="original", description="Images as in the official files (RGB)."),
    ImageConfig(name="short_side_384", short_side=384,
                description="Images downscaled so that the shorter side is 384 pixels."),
)

PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}


def encode_image(data: bytes, *, encoding: str, short_side: int | None = None) -> bytes:
  """Encoded image bytes -> RGB `encoding` ('jpeg' | 'png') bytes, at most `short_side`.

  The input bytes are returned unchanged when they already are an RGB image in `encoding`
  that needs no resizing; otherwise the image is converted to RGB, downscaled (bicubic,
  aspect ratio kept) so that its shorter side is `short_side`, and re-encoded (JPEG
  quality 95).
  """
  with Image.open(io.BytesIO(data)) as image:
    small_enough = short_side is None or min(image.size) <= short_side
    if image.format == PIL_FORMATS[encoding] and image.mode == "RGB" and small_enough:
      return data
    image = image.convert("RGB")
  if not small_enough:
    width, height = image.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
  out = io.BytesIO()
  image.save(out, format=PIL_FORMATS[encoding], **({"quality": 95} if encoding == "jpeg"
                                                    else {}))
  return out.getvalue()


def read_json(path: epath.Path):
  with path.open("rb") as f:
    return json.load(f)


def read_json_lines(path: epath.Path) -> list[dict]:
  with path.open("r") as f:
    return [json.loads(line) for line in f if line.strip()]


class OfficialBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared plumbing: manual-dir checks, image configs, array_record output."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the official files in the manual dir."}
  BUILDER_CONFIGS = list(IMAGE_CONFIGS)
  # See pydoc_corpus.PydocTopics: avoids tfds 4.9.10's importlib_resources code path.
  code_path = epath.Path(__file__)
  REQUIRED: tuple[ManualFile, ...] = ()
  OPTIONAL: tuple[ManualFile, ...] = ()  # each enables a split; described, never required
  IMAGE_ENCODING = "jpeg"

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions_text(cls)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _image_feature(self) -> tfds.features.Image:
    return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                               encoding_format=self.IMAGE_ENCODING)

  def _image(self, path: epath.Path) -> bytes:
    return encode_image(path.read_bytes(), encoding=self.IMAGE_ENCODING,
                        short_side=self.builder_config.short_side)

  def _checked_manual_dir(self, dl_manager) -> epath.Path:
    """The manual dir, once every REQUIRED entry is there; else ManualFilesMissingError."""
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # TFDS: the directory does not exist or is empty.
      missing_dir = getattr(dl_manager, "_manual_dir", None)  # only to name it
      raise ManualFilesMissingError(missing_message(
          type(self), missing_dir, [f.path for f in self.REQUIRED],
          note="The manual dir does not exist or is empty.")) from None
    missing = [f.path for f in self.REQUIRED if not _present(manual_dir, f.path)]
    if missing:
      raise ManualFilesMissingError(missing_message(type(self), manual_dir, missing))
    return manual_dir

  def _check_files(self, manual_dir: epath.Path, paths: Iterable[epath.Path], what: str):
    """Raises ManualFilesMissingError naming the first missing `paths` (of `what`)."""
    missing = [p for p in dict.fromkeys(paths) if not p.exists()]
    if missing:
      shown = [os.path.relpath(p, manual_dir) for p in missing[:5]]
      raise ManualFilesMissingError(missing_message(
          type(self), manual_dir, shown,
          note=f"{len(missing)} {what} are missing (first {len(shown)} listed)."))


def _present(manual_dir: epath.Path, relative: str) -> bool:
  path = manual_dir / relative.rstrip("/")
  if relative.endswith("/"):
    return path.is_dir() and any(True for _ in path.iterdir())
  return path.is_file()


def _instructions_text(cls) -> str:
  name = cls.name
  lines = [f"Dataset {name!r} reads these official files from its manual dir "
           "(default <data_dir>/downloads/manual/; one tree serves every dataset):"]
  for f in cls.REQUIRED:
    lines.append(f"  <manual_dir>/{f.path}\n      <- {f.source}")
  for f in cls.OPTIONAL:
    lines.append(f"  <manual_dir>/{f.path}   (optional)\n      <- {f.source}")
  lines.append("Unpack archives so that the paths above exist, then run:\n"
               f"  python experiments/prepare_data.py --dataset={name} --data_dir=<data_dir>\n"
               "(files under <data_dir>/downloads/manual/), or in Python:\n"
               f"  datasets.prepare({name!r}, data_dir, manual_dir=...)\n"
               "See docs/reproducing.md, section Datasets.")
  return "\n".join(lines)


def missing_message(cls, manual_dir, missing: list[str], note: str = "") -> str:
  """The ManualFilesMissingError text of builder class `cls`: what is missing, from where
  to download it, and where it goes (shared by the text-task builders)."""
  lines = [f"Dataset {cls.name!r} cannot be built: files are missing from "
           f"manual_dir={os.fspath(manual_dir) if manual_dir else None!r}."]
  if note:
    lines.append(note)
  lines += ["Missing:"] + [f"  {m}" for m in missing] + ["", cls.MANUAL_DOWNLOAD_INSTRUCTIONS]
  return "\n".join(lines)


def instructions(name: str) -> str:
  """What to download for dataset `name` (a key of `BUILDERS`) and where to put it."""
  return BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS


# ---------------------------------------------------------------------------------------
# VQA: VQAv2 and OK-VQA
# ---------------------------------------------------------------------------------------

COCO_TRAIN = ManualFile("coco/train2014/", f"{COCO_ZIPS}/train2014.zip (cocodataset.org)")
COCO_VAL = ManualFile("coco/val2014/", f"{COCO_ZIPS}/val2014.zip (cocodataset.org)")
COCO_TEST = ManualFile("coco/test2015/", f"{COCO_ZIPS}/test2015.zip (cocodataset.org)")


def coco_image_path(manual_dir: epath.Path, subset: str, image_id: int) -> epath.Path:
  """coco/val2014/COCO_val2014_000000391895.jpg for ('val2014', 391895)."""
  return manual_dir / "coco" / subset / f"COCO_{subset}_{image_id:012d}.jpg"


def majority_answer(answers: list[str]) -> str:
  """The most frequent answer; ties go to the first seen; '' for none."""
  if not answers:
    return ""
  counts = collections.Counter(answers)
  best = max(counts.values())
  return next(a for a in answers if counts[a] == best)


@dataclasses.dataclass(frozen=True)
class VqaSplit:
  questions: str           # relative to the manual dir
  annotations: str | None  # None: questions only (test)
  coco_subset: str         # train2014 | val2014 | test2015


class VqaBuilder(OfficialBuilder, skip_registration=True):
  """One example per question: the COCO image, the question and all its answers."""

  SPLITS: dict[str, VqaSplit] = {}
  OPTIONAL_SPLITS: dict[str, VqaSplit] = {}  # built only when the questions file is there

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": self._image_feature(),
            "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
            "question_id": tfds.features.Tensor(shape=(), dtype=np.int64),
            "question": tfds.features.Text(),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "answer_confidences": tfds.features.Sequence(tfds.features.Text()),
            "multiple_choice_answer": tfds.features.Text(),
            "question_type": tfds.features.Text(),
            "answer_type": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = self._checked_manual_dir(dl_manager)
    splits = dict(self.SPLITS)
    for split, spec in self.OPTIONAL_SPLITS.items():
      if (manual_dir / spec.questions).is_file():
        splits[split] = spec
    out = {}
    for split, spec in splits.items():
      rows = self._rows(manual_dir, spec)
      image_paths = {r["image_id"]: coco_image_path(manual_dir, spec.coco_subset, r["image_id"])
                     for r in rows}
      self._check_files(manual_dir, [image_paths[i] for i in sorted(image_paths)],
                        f"COCO {spec.coco_subset} images of split {split!r}")
      out[split] = self._generate_examples(rows, image_paths)
    return out

  def _rows(self, manual_dir: epath.Path, spec: VqaSplit) -> list[dict]:
    """Questions joined with their annotations (by question_id), in question-file order."""
    questions = read_json(manual_dir / spec.questions)["questions"]
    annotations = {}
    if spec.annotations:
      annotations = {a["question_id"]: a
                     for a in read_json(manual_dir / spec.annotations)["annotations"]}
      unanswered = [q["question_id"] for q in questions if q["question_id"] not in annotations]
      if unanswered:
        raise ValueError(
            f"{spec.annotations} has no annotation for {len(unanswered)} question(s) of "
            f"{spec.questions} (e.g. question_id {unanswered[0]}); are both files from the "
            "same release?")
    rows = []
    for q in questions:
      a = annotations.get(q["question_id"], {})
      answers = [x["answer"] for x in a.get("answers", [])]
      rows.append({
          "image_id": int(q["image_id"]),
          "question_id": int(q["question_id"]),
          "question": q["question"],
          "answers": answers,
          "answer_confidences": [x.get("answer_confidence", "") for x in a.get("answers", [])],
          "multiple_choice_answer": a.get("multiple_choice_answer") or majority_answer(answers),
          "question_type": str(a.get("question_type", "")),
          "answer_type": str(a.get("answer_type", "")),
      })
    return rows

  def _generate_examples(self, rows: list[dict], image_paths: dict[int, epath.Path]):
    for row in rows:
      yield row["question_id"], {**row, "image": self._image(image_paths[row["image_id"]])}


class Vqav2(VqaBuilder):
  """VQA v2 (Goyal et al., 2017): open-ended questions about COCO images, 10 answers each."""

  HOMEPAGE = "https://visualqa.org/download.html"
  SPLITS = {
      "train": VqaSplit("vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
                        "vqav2/v2_mscoco_train2014_annotations.json", "train2014"),
      "validation": VqaSplit("vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                             "vqav2/v2_mscoco_val2014_annotations.json", "val2014"),
  }
  OPTIONAL_SPLITS = {
      "test_dev": VqaSplit("vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json", None,
                           "test2015"),
  }
  REQUIRED = (
      ManualFile(SPLITS["train"].questions, f"{VISUALQA}/v2_Questions_Train_mscoco.zip "
                 f"({HOMEPAGE})"),
      ManualFile(SPLITS["train"].annotations, f"{VISUALQA}/v2_Annotations_Train_mscoco.zip"),
      ManualFile(SPLITS["validation"].questions, f"{VISUALQA}/v2_Questions_Val_mscoco.zip"),
      ManualFile(SPLITS["validation"].annotations,
                 f"{VISUALQA}/v2_Annotations_Val_mscoco.zip"),
      COCO_TRAIN,
      COCO_VAL,
  )
  OPTIONAL = (
      ManualFile(OPTIONAL_SPLITS["test_dev"].questions,
                 f"{VISUALQA}/v2_Questions_Test_mscoco.zip (split 'test_dev'; no answers: "
                 "score on the evaluation server)"),
      ManualFile(COCO_TEST.path, COCO_TEST.source + " (for split 'test_dev')"),
  )


class OkVqa(VqaBuilder):
  """OK-VQA v1.1 (Marino et al., 2019): questions needing outside knowledge, COCO images.

  The official test set is COCO val2014's questions; it is the 'validation' split here.
  """

  HOMEPAGE = OKVQA_HOME
  SPLITS = {
      "train": VqaSplit("okvqa/OpenEnded_mscoco_train2014_questions.json",
                        "okvqa/mscoco_train2014_annotations.json", "train2014"),
      "validation": VqaSplit("okvqa/OpenEnded_mscoco_val2014_questions.json",
                             "okvqa/mscoco_val2014_annotations.json", "val2014"),
  }
  REQUIRED = tuple(
      ManualFile(path, f"{OKVQA}/{path.split('/')[-1]}.zip ({OKVQA_HOME})")
      for spec in SPLITS.values() for path in (spec.questions, spec.annotations)
  ) + (COCO_TRAIN, COCO_VAL)


# ---------------------------------------------------------------------------------------
# Captions: COCO and Flickr30k with Karpathy's splits
# ---------------------------------------------------------------------------------------

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


class KarpathyCaptionsBuilder(OfficialBuilder, skip_registration=True):
  """One example per image: the image and all its reference captions."""

  KARPATHY_JSON = ""

  def _image_path(self, manual_dir: epath.Path, entry: dict) -> epath.Path:
    raise NotImplementedError

  def _image_id(self, entry: dict) -> int:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": self._image_feature(),
            "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
            "filename": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "karpathy_split": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = self._checked_manual_dir(dl_manager)
    entries = read_json(manual_dir / self.KARPATHY_JSON)["images"]
    unknown = sorted({e["split"] for e in entries} - set(KARPATHY_SPLITS))
    if unknown:
      raise ValueError(f"{self.KARPATHY_JSON}: unknown split(s) {unknown}; expected "
                       f"{sorted(KARPATHY_SPLITS)}.")
    by_split = collections.defaultdict(list)
    for e in entries:
      by_split[KARPATHY_SPLITS[e["split"]]].append(e)
    self._check_files(manual_dir, [self._image_path(manual_dir, e) for e in entries],
                      f"images listed in {self.KARPATHY_JSON}")
    return {split: self._generate_examples(manual_dir, by_split[split])
            for split in ("train", "validation", "test")}

  def _generate_examples(self, manual_dir: epath.Path, entries: list[dict]):
    for e in entries:
      path = self._image_path(manual_dir, e)
      yield self._image_id(e), {
          "image": self._image(path),
          "image_id": self._image_id(e),
          "filename": os.path.join(e.get("filepath", ""), e["filename"]),
          "captions": [s["raw"] for s in e["sentences"]],
          "karpathy_split": e["split"],
      }


class CocoKarpathy(KarpathyCaptionsBuilder):
  """COCO captions (Chen et al., 2015) on Karpathy & Fei-Fei's split; restval -> train."""

  HOMEPAGE = "https://cs.stanford.edu/people/karpathy/deepimagesent/"
  KARPATHY_JSON = "karpathy/dataset_coco.json"
  REQUIRED = (ManualFile(KARPATHY_JSON, f"{KARPATHY_ZIP} ({HOMEPAGE})"), COCO_TRAIN, COCO_VAL)

  def _image_path(self, manual_dir, entry):
    return manual_dir / "coco" / entry["filepath"] / entry["filename"]

  def _image_id(self, entry):
    return int(entry["cocoid"])


class Flickr30kKarpathy(KarpathyCaptionsBuilder):
  """Flickr30k (Young et al., 2014) captions on Karpathy & Fei-Fei's split (retrieval)."""

  HOMEPAGE = "https://shannon.cs.illinois.edu/DenotationGraph/"
  KARPATHY_JSON = "karpathy/dataset_flickr30k.json"
  REQUIRED = (ManualFile(KARPATHY_JSON, f"{KARPATHY_ZIP} "
                         "(https://cs.stanford.edu/people/karpathy/deepimagesent/)"),
              ManualFile("flickr30k/flickr30k-images/", FLICKR30K_IMAGES))

  def _image_path(self, manual_dir, entry):
    return manual_dir / "flickr30k" / "flickr30k-images" / entry["filename"]

  def _image_id(self, entry):
    return int(os.path.splitext(entry["filename"])[0])


# ---------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------

NLVR2_SPLITS = {"train": "train", "validation": "dev", "test": "test1"}


def nlvr2_image_names(identifier: str) -> tuple[str, str]:
  """'dev-850-0-0' -> ('dev-850-0-img0.png', 'dev-850-0-img1.png')."""
  prefix = identifier.rsplit("-", 1)[0]
  return f"{prefix}-img0.png", f"{prefix}-img1.png"


def nlvr2_label(label) -> int:
  """'True' / 'False' (any case, or a bool) -> 1 / 0."""
  text = str(label).strip().lower()
  if text not in ("true", "false"):
    raise ValueError(f"NLVR2 label {label!r} is neither 'True' nor 'False'.")
  return int(text == "true")


class Nlvr2(OfficialBuilder):
  """NLVR2 (Suhr et al., 2019): is a sentence true of a pair of photographs?

  Splits: train, validation (= dev), test (= test1, the public test set).
  """

  HOMEPAGE = "https://lil.nlp.cornell.edu/nlvr/"
  IMAGE_ENCODING = "png"
  REQUIRED = tuple(
      ManualFile(f"nlvr2/{name}.json", f"{NLVR2_DATA}/{name}.json (JSON lines; "
                 "github.com/lil-lab/nlvr, directory nlvr2/data)")
      for name in NLVR2_SPLITS.values()) + tuple(
          ManualFile(f"nlvr2/images/{name}/", NLVR2_IMAGES) for name in NLVR2_SPLITS.values())

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": self._image_feature(),
            "image2": self._image_feature(),
            "sentence": tfds.features.Text(),
            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
            "identifier": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = self._checked_manual_dir(dl_manager)
    out = {}
    for split, name in NLVR2_SPLITS.items():
      rows = read_json_lines(manual_dir / f"nlvr2/{name}.json")
      # The train images sit in numbered subdirectories (the rows' 'directory' field), so
      # every image under images/<name>/ is indexed by file name, at any depth.
      index = {}
      for root, _, files in os.walk(manual_dir / "nlvr2" / "images" / name):
        for f in files:
          index.setdefault(f, epath.Path(root) / f)
      image_dir = manual_dir / "nlvr2" / "images" / name
      wanted = [index.get(f, image_dir / str(r.get("directory", "")) / f) for r in rows
                for f in nlvr2_image_names(r["identifier"])]
      self._check_files(manual_dir, wanted, f"NLVR2 {name} images")
      out[split] = self._generate_examples(rows, index)
    return out

  def _generate_examples(self, rows: list[dict], index: dict[str, epath.Path]):
    for r in rows:
      left, right = nlvr2_image_names(r["identifier"])
      yield r["identifier"], {
          "image": self._image(index[left]), "image2": self._image(index[right]),
          "sentence": r["sentence"], "label": nlvr2_label(r["label"]),
          "identifier": r["identifier"],
      }


BUILDERS: dict[str, type[OfficialBuilder]] = {
    "vqav2": Vqav2,
    "ok_vqa": OkVqa,
    "coco_karpathy": CocoKarpathy,
    "nlvr2": Nlvr2,
    "flickr30k_karpathy": Flickr30kKarpathy,
}
