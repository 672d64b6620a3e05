"""metalm_jax.data: TFDS datasets (prepared once, read without TensorFlow), tokenizers, and
grain pipelines that turn documents and image-text examples into fixed-shape batches.

    from metalm_jax import data
    data.prepare("pydoc_topics", data_dir)                 # or experiments/prepare_data.py
    source = data.data_source("pydoc_topics", "train", data_dir)
    tokenizer = data.get_tokenizer("byte")
    batches = iter(data.lm_dataset(source, tokenizer, seq_len=128, batch_size=8, seed=0))

Vision-language data (`vl_sources`: digits_vl and the official COCO / Flickr30k / VQAv2 /
OK-VQA / NLVR2 in one example format; `images`: digits / RGB / CLIP preprocessing):

    data.check_prepared(["coco_karpathy", "vqav2"], data_dir, what="mPLUG on COCO")
    coco = data.vl_source("coco_karpathy", "train", data_dir, image_size=224,
                          per_caption=True)
    tokenizer = data.vl_tokenizer(data_dir, vocab_size=30000)
    pairs = data.image_text_dataset(coco, tokenizer, task="pretrain", text_len=40,
                                    batch_size=64, seed=0, image_size=224, channels=3,
                                    image_kind="clip")                   # mPLUG
    rows = data.vl_dataset(coco, tokenizer, seq_len=64, batch_size=64, seed=0,
                           max_images=1, image_size=224, num_channels=3,
                           image_kind="rgb")                             # METALM
"""
from metalm_jax.data.datasets import DATASETS
from metalm_jax.data.datasets import DatasetNotPreparedError
from metalm_jax.data.datasets import data_source
from metalm_jax.data.datasets import default_data_dir
from metalm_jax.data.datasets import prepare
from metalm_jax.data.image_text_pipeline import image_text_dataset
from metalm_jax.data.image_text_pipeline import image_text_eval_batches
from metalm_jax.data.images import preprocess_image
from metalm_jax.data.images import resize_image
from metalm_jax.data.pipeline import count_eval_batches
from metalm_jax.data.pipeline import eval_batches
from metalm_jax.data.pipeline import lm_dataset
from metalm_jax.data.pipeline import make_global_batch
from metalm_jax.data.tokenizers import ByteTokenizer
from metalm_jax.data.tokenizers import SentencePieceTokenizer
from metalm_jax.data.tokenizers import Tokenizer
from metalm_jax.data.tokenizers import get_tokenizer
from metalm_jax.data.tokenizers import train_sentencepiece
from metalm_jax.data.vl_pipeline import vl_dataset
from metalm_jax.data.vl_pipeline import vl_eval_batches
from metalm_jax.data.vl_sources import answer_list
from metalm_jax.data.datasets import check_prepared
from metalm_jax.data.vl_sources import clean_text
from metalm_jax.data.vl_sources import vl_source
from metalm_jax.data.vl_sources import vl_tokenizer
