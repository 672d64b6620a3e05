"""Test setup: 8 virtual CPU devices (before jax is imported) and shared fixtures."""
import os
import tempfile

# 8 virtual devices for sharding tests; cheaper XLA CPU compilation (tests are compile-bound).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the test workers and the training subprocesses
# they start (kill / resume, multi-process): a relaunched run reuses its compiled steps.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"metalm_jax_tests_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


def tiny_config(data_dir, **overrides):
  """configs/decoder_lm.py:size=test on `data_dir`, 6 steps; overrides as {'a.b': value}."""
  import ml_collections
  from metalm_jax import config as config_lib
  from tests.test_config import load_config

  config = ml_collections.ConfigDict(load_config("decoder_lm", "size=test").to_dict())
  config.data.data_dir = data_dir
  config.num_train_steps = 6
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 3
  config.log_every_steps = 1
  config.sample.max_new_tokens = 4
  for key, value in overrides.items():
    config_lib.set_dotted(config, key, value)
  return config


@pytest.fixture(scope="session")
def uninterrupted(pydoc_data_dir, tmp_path_factory):
  """One finished 6-step run of the test config: (workdir, config, result)."""
  from metalm_jax.train import trainer

  workdir = str(tmp_path_factory.mktemp("straight"))
  config = tiny_config(pydoc_data_dir)
  result = trainer.train_and_evaluate(config, workdir)
  return workdir, config, result


@pytest.fixture(scope="session")
def family_data_dir(tmp_path_factory):
  """pydoc_topics (+ the 1024-piece tokenizer of the configs), digits_vl and the generated
  pydoc_tasks, prepared once: what every config's runlocal variant reads."""
  from metalm_jax.data import datasets, generated, tokenizers

  data_dir = str(tmp_path_factory.mktemp("family_data"))
  datasets.prepare("pydoc_topics", data_dir)
  datasets.prepare("digits_vl", data_dir)
  for vocab_size in (512, 1024):  # size=test and size=tiny
    tokenizers.get_tokenizer("sentencepiece", dataset="pydoc_topics", data_dir=data_dir,
                             vocab_size=vocab_size)
  generated.prepare("pydoc_tasks", data_dir)
  return data_dir


def runlocal_config(name: str, arg: str, data_dir: str, **overrides):
  """configs/<name>.py at `arg` (+ runlocal=1), unlocked, reading `data_dir`; `overrides`
  as {'a.b': value}."""
  import ml_collections
  from metalm_jax import config as config_lib

  arg = ",".join(filter(None, [arg, "runlocal=1"]))
  config = ml_collections.ConfigDict(config_lib.config_module(name).get_config(arg).to_dict())
  config.data.data_dir = data_dir
  for key, value in overrides.items():
    config_lib.set_dotted(config, key, value)
  return config
