"""config.optimizer numbers out of range are errors naming key, value and valid range (issue 21)."""
import ml_collections
import pytest

from metalm_jax import config as config_lib


def _config(**optimizer):
  config = config_lib.base_config()
  config.model = ml_collections.ConfigDict(dict(name="decoder", vocab_size=11, d_model=8,
                                                num_layers=1, num_heads=2, d_ff=16))
  for key, value in optimizer.items():
    with config.optimizer.ignore_type():
      config.optimizer[key] = value
  return config


def test_defaults_and_edges_are_valid():
  config_lib.validate(_config())
  config_lib.validate(_config(warmup_steps=0, end_lr_ratio=0.0, b1=0.0, b2=0.0,
                              weight_decay=0.0, grad_clip_norm=0.0))
  config_lib.validate(_config(end_lr_ratio=1.0, b1=0.999, b2=0.9999, learning_rate=1))


@pytest.mark.parametrize("key, value, valid", [
    ("learning_rate", -1.0, "> 0"),  # the issue: accepted, and the loss climbed to 339
    ("learning_rate", 0.0, "> 0"),
    ("warmup_steps", -5, ">= 0"),
    ("end_lr_ratio", -0.1, "in [0, 1]"),
    ("end_lr_ratio", 1.5, "in [0, 1]"),
    ("b1", 1.0, "in [0, 1)"),
    ("b1", -0.1, "in [0, 1)"),
    ("b2", 1.0, "in [0, 1)"),
    ("eps", 0.0, "> 0"),
    ("eps", -1e-8, "> 0"),
    ("weight_decay", -0.1, ">= 0"),
    ("grad_clip_norm", -1.0, ">= 0"),
])
def test_out_of_range_names_key_value_and_range(key, value, valid):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_config(**{key: value}))
  message = str(e.value)
  assert f"config.optimizer.{key}={value!r}" in message
  assert f"valid: {valid}" in message


@pytest.mark.parametrize("key, value", [
    ("learning_rate", float("nan")), ("eps", float("inf")), ("warmup_steps", 2.5),
    ("b1", True), ("weight_decay", "0.1")])
def test_non_finite_or_non_numbers_are_errors(key, value):
  with pytest.raises(config_lib.ConfigError, match=f"config.optimizer.{key}="):
    config_lib.validate(_config(**{key: value}))


def test_command_line_override_is_checked():
  """What `--config.optimizer.learning_rate=-1` does: override a finalized config."""
  config = config_lib.config_module("decoder_lm").get_config("size=test")
  config.optimizer.learning_rate = -1.0
  with pytest.raises(config_lib.ConfigError, match=r"learning_rate=-1\.0 is out of range"):
    config_lib.validate(config)
