"""`digits_vl`: a real vision-language dataset from scikit-learn's handwritten digits.

scikit-learn ships 1,797 real 8x8 grayscale scans of handwritten digits (UCI "optdigits",
values 0..16; `sklearn.datasets.load_digits`). This builder turns every image into
templated vision-language examples, written as array_record and readable without
TensorFlow (`datasets.data_source("digits_vl", split, data_dir)`):

  task 'caption'  question ''                                   answer 'a handwritten digit seven.'
  task 'vqa'      question 'which digit is this?'               answer 'seven'
                  question 'is the digit even or odd?'          answer 'odd'
                  question 'is the digit greater than five?'    answer 'yes' | 'no'
  task 'nlvr2'    two images + a statement, e.g.                answer 'true' | 'false'
                  'the left digit is larger than the right digit.'

So each image gives 1 caption + 3 VQA examples + 1 NLVR2-style pair (where it is the left
image). Pairs are drawn within a split, and within each split exactly half of the pairs
(rounded) are 'true', so a constant answer scores 50%.

Images: stored at the native 8x8 (shape [8, 8, 1], uint8, PNG), the 17 scan levels 0..16
mapped to round(v * 255 / 16) (`to_uint8`; exactly invertible). Upscaling is the input
pipeline's choice (`vl_pipeline`: nearest-neighbour to `image_size`), so the stored data
stays the real data. Single-image examples carry an all-zero 'image2' and num_images = 1.

Splits: image i goes to 'test' when sha256("digits:{i}") % 10 == 0, to 'validation' when
it is 1, else to 'train' (~80/10/10: 1,453 / 160 / 184 images, so 7,265 / 800 / 920 examples). The
assignment depends only on the index, so no image is in two splits and every machine builds
the same splits. Pair partners are chosen with a generator seeded by the split name.

Features per example:
  image        Image uint8 [8, 8, 1]   the (left) image
  image2       Image uint8 [8, 8, 1]   the right image of an NLVR2 pair; zeros otherwise
  num_images   int32 []                1 or 2
  label        int32 []                the digit of `image`
  label2       int32 []                the digit of `image2`; -1 if none
  index        int32 []                scikit-learn row of `image`
  index2       int32 []                scikit-learn row of `image2`; -1 if none
  task         Text                    'caption' | 'vqa' | 'nlvr2'
  question     Text                    the question or statement ('' for captions)
  answer       Text                    the target text (for 'caption': the caption)
  caption      Text                    the caption of `image`

This module must stay importable on its own: grain worker processes re-import it.
"""
import hashlib
import io

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

SPLITS = ("train", "validation", "test")
TASKS = ("caption", "vqa", "nlvr2")
IMAGE_SHAPE = (8, 8, 1)
NUM_LEVELS = 16  # scikit-learn's digits take the values 0..16.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

VQA_QUESTIONS = (
    "which digit is this?",
    "is the digit even or odd?",
    "is the digit greater than five?",
)
# statement -> its truth as a function of (left digit, right digit).
NLVR2_STATEMENTS = {
    "the left digit is larger than the right digit.": lambda a, b: a > b,
    "the left digit is smaller than the right digit.": lambda a, b: a < b,
    "the two digits are the same.": lambda a, b: a == b,
}


def split_of(index: int) -> str:
  """The split of scikit-learn row `index`: 'test' / 'validation' ~10% each, else 'train'."""
  digest = int(hashlib.sha256(f"digits:{index}".encode("utf-8")).hexdigest(), 16) % 10
  return "test" if digest == 0 else "validation" if digest == 1 else "train"


def caption(label: int) -> str:
  """'a handwritten digit seven.' for label 7."""
  return f"a handwritten digit {DIGIT_WORDS[label]}."


def vqa_answer(question: str, label: int) -> str:
  """The answer to one of `VQA_QUESTIONS` about a digit."""
  if question == VQA_QUESTIONS[0]:
    return DIGIT_WORDS[label]
  if question == VQA_QUESTIONS[1]:
    return "even" if label % 2 == 0 else "odd"
  if question == VQA_QUESTIONS[2]:
    return "yes" if label > 5 else "no"
  raise ValueError(f"Unknown question {question!r}; questions: {list(VQA_QUESTIONS)}.")


def nlvr2_answer(statement: str, left: int, right: int) -> str:
  """'true' / 'false': the truth of one of `NLVR2_STATEMENTS` about (left, right) digits."""
  if statement not in NLVR2_STATEMENTS:
    raise ValueError(f"Unknown statement {statement!r}; statements: {list(NLVR2_STATEMENTS)}.")
  return "true" if NLVR2_STATEMENTS[statement](left, right) else "false"


def template_texts() -> list[str]:
  """Every question, statement, answer and caption the templates can produce."""
  texts = list(VQA_QUESTIONS) + list(NLVR2_STATEMENTS) + ["true", "false"]
  for label in range(10):
    texts.append(caption(label))
    texts.extend(vqa_answer(q, label) for q in VQA_QUESTIONS)
  return sorted(set(texts))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """scikit-learn's digit values 0..16 (any shape) -> uint8 0..255, round(v * 255 / 16)."""
  return np.round(np.asarray(images, np.float64) * (255.0 / NUM_LEVELS)).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, 1] or [H, W] -> grayscale PNG bytes (TFDS without TF needs encoded images)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"png_bytes needs uint8 pixels, got {image.dtype}; use to_uint8 first.")
  out = io.BytesIO()
  Image.fromarray(image.reshape(image.shape[:2]), mode="L").save(out, format="PNG")
  return out.getvalue()


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: (uint8 images [1797, 8, 8, 1], int labels [1797])."""
  try:
    from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("digits_vl needs scikit-learn: pip install scikit-learn==1.9.1") from e
  digits = sklearn_datasets.load_digits()
  return to_uint8(digits.images)[..., None], digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Split name -> the sorted scikit-learn rows of that split."""
  splits = np.array([split_of(i) for i in range(len(labels))])
  return {s: np.flatnonzero(splits == s) for s in SPLITS}


def nlvr2_pairs(indices: np.ndarray, labels: np.ndarray, split: str) -> list[tuple]:
  """One pair per image of a split, with exactly balanced (+-1) true / false answers.

  Pair k has left image indices[k]; its statement and wanted truth ('true' for even k) fix
  the right image, drawn uniformly among the split's other images that make the statement
  have that truth (the statement is redrawn when none does, e.g. 'larger' with a left 0).

  Returns:
    [(left index, right index, statement, answer)], len(indices) of them.
  """
  rng = np.random.default_rng(int(hashlib.sha256(split.encode()).hexdigest(), 16) % 2**32)
  statements = list(NLVR2_STATEMENTS)
  split_labels = np.asarray(labels)[indices]
  pairs = []
  for k, left in enumerate(indices):
    want = "true" if k % 2 == 0 else "false"
    for statement in rng.permutation(statements):
      truth = NLVR2_STATEMENTS[statement](labels[left], split_labels)  # bool [n]
      right_ok = indices[(truth == (want == "true")) & (indices != left)]
      if right_ok.size:
        pairs.append((int(left), int(rng.choice(right_ok)), str(statement), want))
        break
    else:
      raise ValueError(f"No partner for image {left} in split {split!r} with answer {want!r}.")
  return pairs


class DigitsVl(tfds.core.GeneratorBasedBuilder):
  """Captioning, VQA and NLVR2-style pairs over scikit-learn's handwritten digits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Captions, 3 VQA templates and balanced pairs per image."}
  # See pydoc_corpus.PydocTopics: avoids tfds 4.9.10's importlib_resources code path.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    image = lambda: tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8,
                                        encoding_format="png")
    scalar = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=("scikit-learn's 1,797 handwritten 8x8 digits as templated captioning, "
                     "VQA and two-image true/false (NLVR2-style) examples."),
        features=tfds.features.FeaturesDict({
            "image": image(), "image2": image(), "num_images": scalar(),
            "label": scalar(), "label2": scalar(), "index": scalar(), "index2": scalar(),
            "task": tfds.features.Text(), "question": tfds.features.Text(),
            "answer": tfds.features.Text(), "caption": tfds.features.Text(),
        }),
        homepage="https://archive.ics.uci.edu/dataset/80",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the images ship with scikit-learn.
    images, labels = load_digits()
    indices = split_indices(labels)
    return {s: self._generate_examples(s, indices[s], images, labels) for s in SPLITS}

  def _generate_examples(self, split, indices, images, labels):
    pngs = {int(i): png_bytes(images[i]) for i in indices}
    blank = png_bytes(np.zeros(IMAGE_SHAPE, np.uint8))

    def example(i, task, question, answer, j=-1):
      return {"image": pngs[i], "image2": blank if j < 0 else pngs[j],
              "num_images": 1 if j < 0 else 2, "label": int(labels[i]),
              "label2": -1 if j < 0 else int(labels[j]), "index": i, "index2": j,
              "task": task, "question": question, "answer": answer,
              "caption": caption(labels[i])}

    for i in map(int, indices):
      yield f"caption/{i}", example(i, "caption", "", caption(labels[i]))
      for q, question in enumerate(VQA_QUESTIONS):
        yield f"vqa/{i}/{q}", example(i, "vqa", question, vqa_answer(question, labels[i]))
    for left, right, statement, answer in nlvr2_pairs(indices, labels, split):
      yield f"nlvr2/{left}", example(left, "nlvr2", statement, answer, right)
