"""Dataset registry: prepare a TFDS builder once, then read it with random access.

    builder = prepare("pydoc_topics", data_dir)        # writes array_record files, idempotent
    source = data_source("pydoc_topics", "train", data_dir)
    source[0]  # {'topic': b'assert', 'text': b'The "assert" statement ...'}

The official benchmarks (`official.BUILDERS`: vqav2, ok_vqa, coco_karpathy, nlvr2,
flickr30k_karpathy) read files you download yourself from a manual dir (default
`<data_dir>/downloads/manual`): `prepare("vqav2", data_dir, manual_dir=...)`; so do the
text-to-text tasks of `text_tasks.BUILDERS` (squad_v1, superglue/{boolq,cb,rte,copa},
cnn_dailymail). A name may pick a builder config, TFDS-style:
`prepare("vqav2/short_side_384", ...)`, `prepare("superglue/cb", ...)`.

Reading never prepares implicitly: a missing dataset raises `DatasetNotPreparedError`, whose
message gives the command that prepares it (preparing inside a multi-process training job
would race).
"""
import os
from typing import Any, Sequence

import tensorflow_datasets as tfds

from metalm_jax.data import digits
from metalm_jax.data import official
from metalm_jax.data import pydoc_corpus
from metalm_jax.data import text_tasks

DATASETS: dict[str, type[tfds.core.DatasetBuilder]] = {
    "pydoc_topics": pydoc_corpus.PydocTopics,
    "digits_vl": digits.DigitsVl,
    **official.BUILDERS,
    **text_tasks.BUILDERS,
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
  """Returns the (possibly unprepared) builder of a registered dataset ('name[/config]')."""
  base, _, config = name.partition("/")
  if base not in DATASETS:
    raise ValueError(f"Unknown dataset {base!r}; known datasets: {sorted(DATASETS)}.")
  kwargs = {"config": config} if config else {}
  return DATASETS[base](data_dir=data_dir or default_data_dir(), **kwargs)


def prepare(name: str, data_dir: str | None = None,
            manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Generates dataset `name` under `data_dir` unless already there; returns its builder.

  `manual_dir`: where the official files of a manually downloaded dataset are (default
  `<data_dir>/downloads/manual`); see `official.instructions(name)`.
  """
  builder = get_builder(name, data_dir)
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)
  return builder


def data_source(name: str, split: str, data_dir: str | None = None) -> Any:
  """Random-access source over one split of a prepared dataset.

  Args:
    name: a key of `DATASETS`, optionally with a builder config: 'vqav2/short_side_384'.
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
    manual = (f"\n(after putting its official files under {data_dir}/downloads/manual; "
              "see docs/reproducing.md)" if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else "")
    raise DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared in data_dir={data_dir!r} (no {builder.data_path}). "
        f"Prepare it once with:\n  {prepare_command(name, data_dir)}{manual}")
  sizes = {s: builder.info.splits[s].num_examples for s in sorted(builder.info.splits)}
  for part in split.split("+"):
    if part.split("[")[0].strip() not in sizes:
      raise ValueError(f"Unknown split {split!r} of dataset {name!r}; splits: {list(sizes)}.")
  if builder.info.splits[split].num_examples == 0:
    raise ValueError(
        f"Split {split!r} of dataset {name!r} in {data_dir!r} has no examples "
        f"(split sizes: {sizes}); choose a non-empty split.")
  return builder.as_data_source(split=split)


def check_prepared(names: Sequence[str], data_dir: str | None = None, *, what: str) -> None:
  """Raises `datasets.DatasetNotPreparedError` naming every dataset of `names` that is not
  prepared in data_dir, each with the command that prepares it.

  Args:
    names: dataset names ('vqav2', 'vqav2/short_side_384', 'digits_vl', 'superglue/cb', ...).
    data_dir: the data directory (default `datasets.default_data_dir()`).
    what: who needs them, for the message: "mPLUG's COCO pretraining".

  Raises:
    ValueError: an unknown dataset name.
  """
  data_dir = data_dir or default_data_dir()
  names = list(dict.fromkeys(names))
  builders = {n: get_builder(n, data_dir) for n in names}
  missing = [n for n in names if not builders[n].is_prepared()]
  if not missing:
    return
  manual = [n for n in missing if builders[n].MANUAL_DOWNLOAD_INSTRUCTIONS]
  lines = [f"{what} needs {len(names)} dataset(s); {len(missing)} not prepared in "
           f"data_dir={data_dir!r}: {', '.join(missing)}."]
  if manual:
    lines.append(
        f"First put the official files of {', '.join(manual)} under "
        f"{os.path.join(data_dir, 'downloads', 'manual')} (what to download and where: "
        f"docs/reproducing.md, section Datasets, or official.instructions(name) / "
        "text_tasks' instructions); then")
  lines.append("prepare each once:")
  lines += [f"  {prepare_command(n, data_dir)}" for n in missing]
  raise DatasetNotPreparedError("\n".join(lines))
