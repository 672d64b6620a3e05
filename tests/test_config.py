"""Config schema: unknown or ill-typed keys are errors that name the key and the valid ones."""
import os

import ml_collections
import pytest

from metalm_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  return config_lib.config_module(name).get_config(arg)


@pytest.mark.parametrize("size", ["test", "tiny", "small", "1b"])
def test_decoder_lm_variants_validate(size):
  config = load_config("decoder_lm", f"size={size}")
  assert config.model.name == "decoder"
  config_lib.validate(config)


def test_unknown_key_in_locked_config_is_an_error():
  config = load_config("decoder_lm", "size=test")
  with pytest.raises(AttributeError, match="learning_rat"):
    config.optimizer.learning_rat = 1.0


def test_unknown_key_in_hand_built_config_names_key_and_valid_keys():
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(dict(name="decoder", vocab_size=11, d_model=8,
                                                num_layers=1, num_heads=2, d_ff=16))
  config_lib.validate(config)
  config.optimizer.learnin_rate = 1e-3
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  message = str(e.value)
  assert "config.optimizer.learnin_rate" in message and "learning_rate" in message
  assert "Did you mean 'learning_rate'" in message


def test_unknown_model_key_lists_constructor_arguments():
  config = load_config("decoder_lm", "size=test").copy_and_resolve_references()
  config.unlock()
  config.model.num_layer = 3
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.num_layer.*num_layers"):
    config_lib.validate(config)


@pytest.mark.parametrize("path,value,match", [
    (("batch_size",), "16", r"config\.batch_size='16' has type str; expected int"),
    (("optimizer", "b1"), "0.9", r"config\.optimizer\.b1='0.9' has type str"),
    (("model", "d_model"), 3.5, r"config\.model\.d_model=3\.5 has type float"),
    (("model", "dtype"), "float33", r"config\.model\.dtype='float33' is not a dtype"),
    (("progress_bar",), 1, r"config\.progress_bar=1 has type int; expected bool"),
])
def test_ill_typed_values_are_errors(path, value, match):
  config = ml_collections.ConfigDict(load_config("decoder_lm", "size=test").to_dict())
  node = config
  for key in path[:-1]:
    node = node[key]
  with node.ignore_type():
    node[path[-1]] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument 'sise'"):
    load_config("decoder_lm", "sise=tiny")
  with pytest.raises(ValueError, match="valid sizes"):
    load_config("decoder_lm", "size=huge")


def test_sequence_longer_than_model_is_an_error():
  config = ml_collections.ConfigDict(load_config("decoder_lm", "size=test").to_dict())
  config.data.seq_len = 4096
  with pytest.raises(config_lib.ConfigError, match="exceeds config.model.max_len"):
    config_lib.validate(config)


@pytest.mark.parametrize("name,arg,workers", [
    ("metalm_vl", "size=paper,data=official", True), ("mplug", "size=base,data=official", True),
    ("mplug", "size=large,data=official,stage=vqa", True),
    ("metalm_vl", "size=tiny,data=official", False), ("mplug", "size=base", False)])
def test_paper_sizes_on_official_images_decode_in_worker_processes(name, arg, workers):
  """A paper-size step decodes and resizes hundreds of JPEGs: not in the training process."""
  assert (load_config(name, arg).data.worker_count > 0) == workers
