r"""Prepares a registered dataset (array_record files) and, optionally, its tokenizer.

    python experiments/prepare_data.py --dataset=pydoc_topics --data_dir=/tmp/metalm_data
    python experiments/prepare_data.py --tokenizer_vocab_size=2048   # + SentencePiece model
    python experiments/prepare_data.py --dataset=vqav2/short_side_384 --manual_dir=/data/manual
    python experiments/prepare_data.py --dataset=digits_official   # generated, see below

Official datasets (vqav2, ok_vqa, coco_karpathy, nlvr2, flickr30k_karpathy) are built from
files you download: --manual_dir (default <data_dir>/downloads/manual); docs/reproducing.md.
So are the text tasks (squad_v1, superglue/{boolq,cb,rte,copa}, cnn_dailymail); see
metalm_jax/data/text_tasks.py. Generated collections (`metalm_jax/data/generated.py`):
digits_official (the digits as official COCO / VQAv2 / OK-VQA / NLVR2 files) and pydoc_tasks
(SQuAD / BoolQ / CNN-DM-format files from Python's help pages), each prepared under
<data_dir>/<name>: the CI-sized data of the paper tables.

Data goes to --data_dir (default: $METALM_DATA_DIR, else ~/.cache/metalm_jax/data). Running
it again is quick: prepared datasets and cached tokenizers are reused.
"""
from absl import app
from absl import flags

from metalm_jax import cli
from metalm_jax.data import datasets
from metalm_jax.data import generated
from metalm_jax.data import tokenizers

_DATASET = flags.DEFINE_string("dataset", "pydoc_topics", "Dataset to prepare, 'name' or "
                               f"'name/config'; names: {sorted(datasets.DATASETS)}, or a "
                               f"generated collection: {sorted(generated.COLLECTIONS)}.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Where the official files of a "
                                  "manually downloaded dataset are (default: "
                                  "<data_dir>/downloads/manual).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data directory (default: $METALM_DATA_DIR, else "
    "~/.cache/metalm_jax/data).")
_TOKENIZER_VOCAB_SIZE = flags.DEFINE_integer(
    "tokenizer_vocab_size", 0, "If > 0, also train (or reuse) the SentencePiece tokenizer "
    "of this vocabulary size on the dataset's train split.")


def main(argv):
  del argv
  cli.setup_logging()
  with cli.user_errors("prepare_data.py"):
    _prepare()


def _prepare():
  data_dir = _DATA_DIR.value or datasets.default_data_dir()
  if _DATASET.value in generated.COLLECTIONS:
    where = generated.prepare(_DATASET.value, data_dir)
    print(f"Generated collection {_DATASET.value!r} is prepared in {where}: "
          f"{', '.join(generated.COLLECTIONS[_DATASET.value])}")
    return
  if _DATASET.value.partition("/")[0] not in datasets.DATASETS:
    raise app.UsageError(f"--dataset={_DATASET.value!r}; known: {sorted(datasets.DATASETS)}")
  builder = datasets.prepare(_DATASET.value, data_dir, manual_dir=_MANUAL_DIR.value)
  print(f"Dataset {_DATASET.value!r} is in {builder.data_path}")
  for split, info in sorted(builder.info.splits.items()):
    print(f"  {split}: {info.num_examples} examples")
  if _TOKENIZER_VOCAB_SIZE.value > 0:
    tokenizer = tokenizers.get_tokenizer(
        "sentencepiece", dataset=_DATASET.value, data_dir=data_dir,
        vocab_size=_TOKENIZER_VOCAB_SIZE.value)
    print(f"SentencePiece tokenizer (vocab_size={tokenizer.vocab_size}) is "
          f"{tokenizer.model_path}")


if __name__ == "__main__":
  app.run(main)
