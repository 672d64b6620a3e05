"""metalm_jax.data: TFDS datasets (prepared once, read without TensorFlow), tokenizers, and
grain pipelines that turn documents into packed, fixed-shape batches.

    from metalm_jax import data
    data.prepare("pydoc_topics", data_dir)                 # or experiments/prepare_data.py
    source = data.data_source("pydoc_topics", "train", data_dir)
    tokenizer = data.get_tokenizer("byte")
    batches = iter(data.lm_dataset(source, tokenizer, seq_len=128, batch_size=8, seed=0))
"""
from metalm_jax.data.datasets import DATASETS
from metalm_jax.data.datasets import DatasetNotPreparedError
from metalm_jax.data.datasets import data_source
from metalm_jax.data.datasets import default_data_dir
from metalm_jax.data.datasets import prepare
from metalm_jax.data.pipeline import count_eval_batches
from metalm_jax.data.pipeline import eval_batches
from metalm_jax.data.pipeline import lm_dataset
from metalm_jax.data.pipeline import make_global_batch
from metalm_jax.data.tokenizers import ByteTokenizer
from metalm_jax.data.tokenizers import SentencePieceTokenizer
from metalm_jax.data.tokenizers import Tokenizer
from metalm_jax.data.tokenizers import get_tokenizer
from metalm_jax.data.tokenizers import train_sentencepiece
