"""Every config trains through the one `train_and_evaluate` (its runlocal variant), pretrain ->
finetune chains through config.init_from, evaluators write their outputs, a finished workdir
is not trained again, and configs that do not fit their family are refused before compute."""
import json
import os

import jax
import numpy as np
import pytest

from metalm_jax import families
from metalm_jax.config import ConfigError
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import evaluate as evaluate_lib
from metalm_jax.train import trainer
from tests.conftest import runlocal_config


def _train(config, workdir):
  result = trainer.train_and_evaluate(config, str(workdir))
  assert result["step"] == config.num_train_steps and result["stopped"] is None
  for name in config.evals.keys():  # every evaluator ran at the last step and was recorded
    record = trainer.read_eval(str(workdir), name, config.num_train_steps)
    assert record is not None and record["metrics"] == result["evals"][name], name
    assert all(np.isfinite(v) for v in record["metrics"].values()), record
  return result


def _params(workdir) -> dict:
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=3, async_save=False)
  state = ckpt.manager.restore(ckpt.latest_step(), args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return state


@pytest.mark.parametrize("name,arg", [("decoder_lm", ""), ("hybrid_lm", "size=test"),
                                      ("metalm_lm", "size=test")])
def test_language_model_configs_train(name, arg, family_data_dir, tmp_path):
  config = runlocal_config(name, arg, family_data_dir)
  result = _train(config, tmp_path)
  assert np.isfinite(result["eval_loss"]) and result["sample"] is not None


# Each config's runlocal variant at its default size, every stage (minutes: run with -m slow).
DEFAULT_SIZE_RUNS = [("hybrid_lm", "", ""), ("metalm_lm", "", ""),
                     ("metalm_vl", "", ""), ("metalm_vl", "stage=finetune", "metalm_vl"),
                     ("mplug", "", ""), ("mplug", "stage=vqa", "mplug"),
                     ("mplug", "stage=caption", "mplug"),
                     ("metalm_multitask", "stage=pretrain", ""),
                     ("metalm_multitask", "", "metalm_multitask:stage=pretrain")]


@pytest.mark.slow
def test_every_config_runlocal_at_its_default_size(family_data_dir, tmp_path):
  for name, arg, init in DEFAULT_SIZE_RUNS:
    overrides = {"init_from.checkpoint": str(tmp_path / init)} if init else {}
    _train(runlocal_config(name, arg, family_data_dir, **overrides),
           tmp_path / ":".join(filter(None, [name, arg])))


def test_metalm_vl_pretrain_then_finetune_from_it(family_data_dir, tmp_path):
  pre = runlocal_config("metalm_vl", "size=test", family_data_dir)
  result = _train(pre, tmp_path / "pre")
  assert set(result["evals"]) == {"eval", "vqa", "vqa_fewshot"}
  with open(os.path.join(tmp_path / "pre", "evals", "vqa_fewshot", "step_6.json")) as f:
    details = json.load(f)["details"]
  assert details["shots"] == 4 and details["samples"][0]["answers"]
  fine = runlocal_config("metalm_vl", "size=test,stage=finetune", family_data_dir,
                         **{"init_from.checkpoint": str(tmp_path / "pre")})
  _train(fine, tmp_path / "fine")
  # The finetune started from the pretrained params (not a fresh init): its first update
  # moved them by at most one AdamW step of the (warmup) learning rate.
  a, b = _params(tmp_path / "pre")["params"], _params(tmp_path / "fine")["params"]
  start = jax.tree.leaves(a)[0]
  assert np.max(np.abs(np.asarray(jax.tree.leaves(b)[0]) - np.asarray(start))) < 0.1


def test_mplug_pretrain_then_finetunes_and_evaluate_from_the_checkpoint(family_data_dir,
                                                                         tmp_path):
  pre = runlocal_config("mplug", "size=test", family_data_dir)
  result = _train(pre, tmp_path / "pre")
  assert {"retrieval", "zero_shot_caption"} == set(result["evals"])
  state = _params(tmp_path / "pre")
  assert set(state["extra"]) == {"momentum", "queues"}
  assert int(state["extra"]["queues"]["ptr"]) == (pre.num_train_steps * pre.batch_size
                                                   % pre.mplug.queue_size)
  high = pre.model.get("max_temperature", 0.5)
  assert 0.001 <= float(state["params"]["temperature"]) <= high
  init = {"init_from.checkpoint": str(tmp_path / "pre")}
  vqa = runlocal_config("mplug", "size=test,stage=vqa", family_data_dir, **init)
  _train(vqa, tmp_path / "vqa")
  assert _params(tmp_path / "vqa").get("extra") is None  # finetuning: no momentum / queues
  # (The caption finetune runs in tests/test_reproduce.py's mplug table.)
  # experiments/evaluate.py's library reproduces the trainer's recorded evaluation.
  again = evaluate_lib.evaluate(vqa, str(tmp_path / "vqa"))
  for name in ("vqa", "vqa_rank"):
    recorded = trainer.read_eval(str(tmp_path / "vqa"), name, vqa.num_train_steps)["metrics"]
    assert again["evals"][name] == pytest.approx(recorded), name


def test_multitask_pretrain_then_finetune(family_data_dir, tmp_path):
  pre = runlocal_config("metalm_multitask", "size=test,stage=pretrain", family_data_dir)
  _train(pre, tmp_path / "pre")
  fine = runlocal_config("metalm_multitask", "size=test", family_data_dir,
                         **{"init_from.checkpoint": str(tmp_path / "pre")})
  result = _train(fine, tmp_path / "fine")
  scores = result["evals"]["tasks"]
  assert {"squad_v1/exact_match", "squad_v1/f1", "boolq/accuracy",
          "cnn_dailymail/rouge_l"} == {k for k in scores if not k.endswith("/num_examples")}
  limit = fine.evals.tasks.limit
  assert all(0 < scores[f"{t}/num_examples"] <= limit for t in ("squad_v1", "boolq"))


def test_a_finished_run_is_not_trained_again(family_data_dir, tmp_path, caplog):
  config = runlocal_config("decoder_lm", "size=test", family_data_dir)
  first = _train(config, tmp_path)
  os.remove(trainer.eval_path(str(tmp_path), "eval", config.num_train_steps))  # killed in eval
  with caplog.at_level("INFO"):
    again = trainer.train_and_evaluate(config, str(tmp_path))
  assert again["already_complete"] and again["step"] == config.num_train_steps
  assert "already complete at step 6" in caplog.text
  assert again["train_loss"] == pytest.approx(first["train_loss"])
  assert again["eval_loss"] == pytest.approx(first["eval_loss"])  # the final eval, run again
  assert trainer.read_eval(str(tmp_path), "eval", config.num_train_steps) is not None
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert sum(r["split"] == "train" and r["step"] == 6 for r in rows) == 1  # nothing retrained


@pytest.mark.parametrize("overrides,match", [
    ({"family": "mplug"}, r"config.family='mplug' trains models \['mplug'\], not "
                          r"config.model.name='decoder'"),
    ({"family": "nope"}, r"config.family='nope' is not a known family"),
    ({"data.mixing_cap": 7}, r"config.data.mixing_cap=7 is not read by family 'lm'"),
    ({"objective": "semi_causal_vl"}, r"belongs to family .metalm_vl."),
    ({"evals.eval.type": "vqaa"}, r"config.evals.eval.type='vqaa' is not a known evaluator"),
    ({"evals.eval.num_batchs": 2}, r"unknown key config.evals.eval.num_batchs.*num_batches"),
])
def test_configs_that_do_not_fit_their_family_are_refused_before_compute(
    overrides, match, family_data_dir, tmp_path):
  unknown = {k: v for k, v in overrides.items() if k == "evals.eval.num_batchs"}
  config = runlocal_config("decoder_lm", "size=test", family_data_dir,
                           **{k: v for k, v in overrides.items() if k not in unknown})
  if unknown:  # a key no config has, as a user's config file could carry it
    config.evals.eval.num_batchs = unknown["evals.eval.num_batchs"]
  with pytest.raises((ConfigError, ValueError, KeyError), match=match):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_metalm_vl_refuses_a_model_without_a_vision_encoder(family_data_dir):
  config = runlocal_config("metalm_vl", "", family_data_dir)
  del config.model["vision_encoder"]
  with pytest.raises(ConfigError, match="needs config.model.mode='dual' with a "
                                        "config.model.vision_encoder"):
    families.build(config)


def test_mplug_finetuning_takes_one_task(family_data_dir):
  config = runlocal_config("mplug", "stage=vqa", family_data_dir, **{"data.tasks": ("vqa",
                                                                                   "caption")})
  with pytest.raises(ConfigError, match=r"mPLUG finetuning takes one task"):
    families.build(config)


@pytest.mark.parametrize("task", ["nlvr2", "vqav2", "coco"])
def test_metalm_vl_reads_each_official_finetuning_dataset(task, tmp_path_factory):
  """Official rows of each finetuning task (captions one per (image, caption); NLVR2 and VQA
  one per example), RGB images at the config's size, two image slots for NLVR2."""
  from tests import vl_test_data
  official = vl_test_data.official_digits_dir(tmp_path_factory)
  config = runlocal_config("metalm_vl", f"size=test,data=official,stage=finetune,task={task}",
                           official)
  family = families.build(config)
  batch = next(iter(family.train_dataset(batch_size=4, process_index=0, process_count=1)))
  size = config.model.vision_encoder.image_size
  assert batch["images"].shape == (4, config.data.max_images, size, size, 3)
  assert (batch["image_mask"].sum(1) == (2 if task == "nlvr2" else 1)).all()

  if task == "nlvr2":  # generation leaves room for the longer label word and EOS
    words = [len(family.tokenizer.encode(" " + w)) for w in ("true", "false")]
    assert family.max_new_tokens("nlvr2") == max(words) + 1
