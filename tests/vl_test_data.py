"""Prepared vision-language data for the data-layer tests, built once per test process.

`digits_vl_dir`: the bundled digits_vl dataset. `official_digits_dir`: the digits written as
official COCO Karpathy / VQAv2 / OK-VQA / NLVR2 files (`data/digits_official.py`, PER_SPLIT
images per digits split) and prepared with the official builders: real official formats, so
the adapters of `data/vl_sources.py` read exactly what they read on the real downloads.
Both live under pytest's base temp dir and are shared by every test file of the process.
"""
import os

from metalm_jax.data import datasets
from metalm_jax.data import digits_official

PER_SPLIT = 4  # images per digits split (train 4, validation 4, test 4)
OFFICIAL = ("coco_karpathy", "vqav2", "ok_vqa", "nlvr2")


def _shared(tmp_path_factory, name: str, build) -> str:
  path = os.path.join(str(tmp_path_factory.getbasetemp()), name)
  done = os.path.join(path, "PREPARED")
  if not os.path.exists(done):
    build(path)
    open(done, "w").close()
  return path


def digits_vl_dir(tmp_path_factory) -> str:
  return _shared(tmp_path_factory, "shared_digits_vl",
                 lambda path: datasets.prepare("digits_vl", path))


def official_digits_dir(tmp_path_factory) -> str:
  def build(path):
    manual = os.path.join(path, "downloads", "manual")
    digits_official.write_official_files(manual, max_images_per_split=PER_SPLIT)
    for name in OFFICIAL:
      datasets.prepare(name, path, manual_dir=manual)
  return _shared(tmp_path_factory, "shared_official_digits", build)
