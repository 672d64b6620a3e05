"""Official-format datasets generated from what installed packages ship, for CI-sized runs.

    root = generated.prepare("digits_official", data_dir)   # -> <data_dir>/digits_official
    datasets.data_source("vqav2", "validation", root)        # the official builder's output

  digits_official  scikit-learn's 1,797 handwritten digits written as official COCO Karpathy,
                   VQAv2, OK-VQA and NLVR2 files (`digits_official.write_official_files`),
                   prepared by the official builders: the vision-language tables' whole path
  pydoc_tasks      SQuAD v1.1-, BoolQ- and CNN/DM-format files generated from Python's help
                   pages (`text_tasks.write_pydoc_task_files`), prepared by the text-task
                   builders: the multitask table's whole path

Each collection lives in its own directory, `<data_dir>/<name>`, apart from real datasets of
the same names, with its generated files under `<data_dir>/<name>/downloads/manual`.
Preparing is idempotent (files are written once, prepared datasets reused); nothing is
downloaded. `experiments/prepare_data.py --dataset=<name>` runs it.
"""
from __future__ import annotations

import os

from metalm_jax.data import datasets, digits_official, text_tasks

COLLECTIONS = {
    "digits_official": ("coco_karpathy", "vqav2", "ok_vqa", "nlvr2"),
    "pydoc_tasks": ("squad_v1", "superglue/boolq", "cnn_dailymail"),
}
_WRITERS = {"digits_official": digits_official.write_official_files,
            "pydoc_tasks": text_tasks.write_pydoc_task_files}
_MARKERS = {"digits_official": digits_official.GENERATED_MARKER,
            "pydoc_tasks": text_tasks.PYDOC_MARKER}


def root(name: str, data_dir: str | None = None) -> str:
  """`<data_dir>/<name>`: where collection `name`'s datasets are prepared."""
  if name not in COLLECTIONS:
    raise ValueError(f"unknown generated collection {name!r}; known: {sorted(COLLECTIONS)}")
  return os.path.join(data_dir or datasets.default_data_dir(), name)


def is_prepared(name: str, data_dir: str | None = None) -> bool:
  where = root(name, data_dir)
  return all(datasets.get_builder(n, where).is_prepared() for n in COLLECTIONS[name])


def prepare(name: str, data_dir: str | None = None) -> str:
  """Writes collection `name`'s files (once) and prepares its datasets; returns its root."""
  where = root(name, data_dir)
  manual = os.path.join(where, "downloads", "manual")
  missing = [n for n in COLLECTIONS[name] if not datasets.get_builder(n, where).is_prepared()]
  if missing:
    if not os.path.exists(os.path.join(manual, _MARKERS[name])):
      _WRITERS[name](manual)
    for dataset in missing:
      datasets.prepare(dataset, where, manual_dir=manual)
  return where
