"""Test setup: 8 virtual CPU devices (before jax is imported) and shared fixtures."""
import os

# 8 virtual devices for sharding tests; cheaper XLA CPU compilation (tests are compile-bound).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import metalm_jax  # noqa: E402,F401  (applies package-wide flax settings)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running; run on purpose with `-m slow`")


@pytest.fixture(scope="session")
def devices8():
  devs = jax.devices()
  if len(devs) < 8:
    pytest.skip(f"needs 8 devices, have {len(devs)}: set XLA_FLAGS before jax is imported")
  return devs[:8]


@pytest.fixture(scope="session")
def pydoc_data_dir(tmp_path_factory):
  """The bundled pydoc_topics corpus and a 512-piece SentencePiece model, prepared once."""
  from metalm_jax.data import datasets, tokenizers

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  datasets.prepare("pydoc_topics", data_dir)
  tokenizers.get_tokenizer("sentencepiece", dataset="pydoc_topics", data_dir=data_dir,
                           vocab_size=512)
  return data_dir
