"""Dataset registry: prepare a TFDS builder once, then read it with random access.

    builder = prepare("pydoc_topics", data_dir)        # writes array_record files, idempotent
    source = data_source("pydoc_topics", "train", data_dir)
    source[0]  # {'topic': b'assert', 'text': b'The "assert" statement ...'}

Reading never prepares implicitly: a missing dataset raises `DatasetNotPreparedError`, whose
message gives the command that prepares it (preparing inside a multi-process training job
would race).
"""
import os
from typing import Any

import tensorflow_datasets as tfds

from metalm_jax.data import digits
from metalm_jax.data import pydoc_corpus

DATASETS: dict[str, type[tfds.core.DatasetBuilder]] = {
    "pydoc_topics": pydoc_corpus.PydocTopics,
    "digits_vl": digits.DigitsVl,
}


class DatasetNotPreparedError(FileNotFoundError):
  """The dataset's files are not in the data directory yet."""


def default_data_dir() -> str:
  """`$METALM_DATA_DIR` if set, else `~/.cache/metalm_jax/data`."""
  return os.environ.get("METALM_DATA_DIR") or os.path.expanduser("~/.cache/metalm_jax/data")


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares dataset `name` in `data_dir`."""
  return f"python experiments/prepare_data.py --dataset={name} --data_dir={data_dir}"


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the (possibly unprepared) builder of a registered dataset."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}.")
  return DATASETS[name](data_dir=data_dir or default_data_dir())


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Generates dataset `name` under `data_dir` unless already there; returns its builder."""
  builder = get_builder(name, data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def data_source(name: str, split: str, data_dir: str | None = None) -> Any:
  """Random-access source over one split of a prepared dataset.

  Args:
    name: a key of `DATASETS`.
    split: a split name, or a TFDS split expression such as 'train[:50%]'.
    data_dir: where the dataset was prepared (default: `default_data_dir()`).

  Returns:
    A sequence-like source (`len`, `source[i]` -> dict of decoded features) for
    `grain.MapDataset.source`.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in `data_dir`.
    ValueError: unknown dataset or split, or the split has no examples.
  """
  data_dir = data_dir or default_data_dir()
  builder = get_builder(name, data_dir)
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared in data_dir={data_dir!r} (no {builder.data_path}). "
        f"Prepare it once with:\n  {prepare_command(name, data_dir)}")
  sizes = {s: builder.info.splits[s].num_examples for s in sorted(builder.info.splits)}
  for part in split.split("+"):
    if part.split("[")[0].strip() not in sizes:
      raise ValueError(f"Unknown split {split!r} of dataset {name!r}; splits: {list(sizes)}.")
  if builder.info.splits[split].num_examples == 0:
    raise ValueError(
        f"Split {split!r} of dataset {name!r} in {data_dir!r} has no examples "
        f"(split sizes: {sizes}); choose a non-empty split.")
  return builder.as_data_source(split=split)
