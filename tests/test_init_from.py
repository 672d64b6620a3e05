"""config.init_from: params of another run, renamed / skipped, every mismatch named."""
import jax
import numpy as np
import pytest

from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import init_from
from metalm_jax.train import restore
from metalm_jax.train import trainer
from tests.conftest import runlocal_config

SOURCE = {"embedder/embedding": (11, 4), "blocks/0/mlp/wi/kernel": (4, 8),
          "head/kernel": (4, 11)}


def test_plan_lines_up_renamed_and_skipped_params():
  target = {"embedder/embedding": (11, 4), "blocks/0/mlp/wi/kernel": (4, 8),
            "lm_head/kernel": (4, 11), "itm_head/kernel": (4, 2)}
  p = init_from.plan(SOURCE, target, rename=[("^head/", "lm_head/")], skip=("^itm_head/",),
                     where="x")
  assert p.source_of == {"embedder/embedding": "embedder/embedding",
                         "blocks/0/mlp/wi/kernel": "blocks/0/mlp/wi/kernel",
                         "lm_head/kernel": "head/kernel"}
  assert p.kept == ["itm_head/kernel"] and p.dropped == []
  # A source param that this model does not have is dropped only when skipped.
  p = init_from.plan(SOURCE, {"embedder/embedding": (11, 4), "blocks/0/mlp/wi/kernel": (4, 8)},
                     rename=[], skip=("^head/",), where="x")
  assert p.dropped == ["head/kernel"]


def test_every_mismatch_is_named_at_once():
  target = {"embedder/embedding": (13, 4), "blocks/0/mlp/wi/kernel": (4, 8),
            "new/kernel": (2, 2)}
  with pytest.raises(init_from.InitFromMismatchError) as e:
    init_from.plan(SOURCE, target, rename=[], skip=(), where="the checkpoint of step 6 in d")
  message = str(e.value)
  assert "3 problems" in message
  assert "embedder/embedding: source embedder/embedding has shape (11, 4), this model (13, 4)" \
      in message
  assert "new/kernel (2, 2): no source param lands here" in message
  assert "source head/kernel (4, 11): used by no param of this model" in message
  assert "config.init_from.rename" in message and "config.init_from.skip" in message


def test_finetune_starts_from_the_source_params_and_resumes_from_its_own(pydoc_data_dir,
                                                                         tmp_path):
  source = runlocal_config("decoder_lm", "size=test", pydoc_data_dir,
                           **{"sample.max_new_tokens": 0})
  trainer.train_and_evaluate(source, str(tmp_path / "source"))
  loaded = restore.restore_params(str(tmp_path / "source"), _model(source),
                                  *_mesh(source)).params
  # Fresh head: the finetune keeps its own init there (skip), everything else is loaded.
  fine = runlocal_config("decoder_lm", "size=test", pydoc_data_dir, num_train_steps=1,
                         **{"init_from.checkpoint": str(tmp_path / "source"),
                            "init_from.skip": ("^head/",), "optimizer.learning_rate": 1e-9,
                            "sample.max_new_tokens": 0, "evals": {}})
  trainer.train_and_evaluate(fine, str(tmp_path / "fine"))
  tuned = _state(tmp_path / "fine")["params"]
  np.testing.assert_allclose(tuned["embedder"]["embedding"],
                             np.asarray(loaded["embedder"]["embedding"]), atol=1e-6)
  assert not np.allclose(tuned["head"]["kernel"], np.asarray(loaded["head"]["kernel"]),
                         atol=1e-3)
  # A second run of the finetune resumes from its own checkpoint, not from the source.
  fine.num_train_steps = 2
  fine.init_from.checkpoint = str(tmp_path / "nowhere")  # would fail if it were read
  result = trainer.train_and_evaluate(fine, str(tmp_path / "fine"))
  assert result["step"] == 2


def test_a_source_of_another_shape_stops_before_anything_is_written(pydoc_data_dir, tmp_path):
  source = runlocal_config("decoder_lm", "size=test", pydoc_data_dir, num_train_steps=1,
                           **{"sample.max_new_tokens": 0, "evals": {}})
  trainer.train_and_evaluate(source, str(tmp_path / "source"))
  other = runlocal_config("decoder_lm", "size=test", pydoc_data_dir,
                          **{"model.d_model": 48, "init_from.checkpoint": str(tmp_path / "source")})
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match=r"do not line up"):
    trainer.train_and_evaluate(other, str(tmp_path / "other"))
  assert not (tmp_path / "other" / "checkpoints").exists() or not list(
      (tmp_path / "other" / "checkpoints").iterdir())


def _model(config):
  from metalm_jax.train import state as state_lib
  return state_lib.Model(config.model)


def _mesh(config):
  from metalm_jax import sharding
  return sharding.make_mesh(config.mesh), config.sharding_rules


def _state(workdir):
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=3, async_save=False)
  state = ckpt.manager.restore(ckpt.latest_step(), args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return jax.device_get(state)
