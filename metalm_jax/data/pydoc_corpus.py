"""`pydoc_topics`: a real text corpus that ships with every CPython.

`pydoc_data.topics.topics` maps ~80 help-topic keys ('assert', 'dict', 'string-methods', ...)
to the plain-text pages of the Python language reference that `help()` prints (~0.5 MB of
English prose and code). This builder turns it into a TFDS dataset written as array_record,
readable without TensorFlow through `tfds.data_source` / `builder.as_data_source`.

Features: 'topic' (the key, Text) and 'text' (the page, Text); both decode to `bytes`.
Splits: a topic goes to 'validation' when the SHA-256 of its key is 0 mod 10 (~10%), else to
'train'; the assignment depends only on the key, so it is the same on every machine. The
pages themselves follow the Python that prepares the dataset (3.11 here); the description
records that version.

This module must stay importable on its own: grain worker processes re-import it.
"""
import hashlib
import platform

from etils import epath
from pydoc_data import topics as pydoc_topics
import tensorflow_datasets as tfds

SPLITS = ("train", "validation")


def split_of(topic: str) -> str:
  """Returns the split of a topic key: 'validation' for ~1 key in 10, else 'train'."""
  digest = int(hashlib.sha256(topic.encode("utf-8")).hexdigest(), 16)
  return "validation" if digest % 10 == 0 else "train"


class PydocTopics(tfds.core.GeneratorBasedBuilder):
  """The pages of Python's `help()` topics, one example per topic."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per pydoc topic; split by SHA-256 of the key."}
  # tfds 4.9.10 derives `code_path` for builders that live in a package through the
  # `importlib_resources` backport, which it does not install on Python >= 3.9; giving the
  # path directly avoids that import (it is only used to look for a checksums file).
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Python's help() topic pages (pydoc_data.topics) from CPython "
            f"{platform.python_version()}: one example per topic."),
        features=tfds.features.FeaturesDict({
            "topic": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
        homepage="https://docs.python.org/3/reference/",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the corpus ships with Python.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    for topic in sorted(pydoc_topics.topics):
      if split_of(topic) == split:
        yield topic, {"topic": topic, "text": pydoc_topics.topics[topic]}
