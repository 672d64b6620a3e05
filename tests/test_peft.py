"""Parameter-efficient finetuning (config.peft, metalm_jax/train/peft.py): LoRA factors beside
the frozen kernels, merged for export; BitFit; the optimizer state only of what trains; clear
errors; the pretrain -> LoRA / BitFit finetune flow through the one trainer."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metalm_jax import config as config_lib
from metalm_jax import objectives, sharding
from metalm_jax.config import ConfigError
from metalm_jax.data import pipeline
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import peft
from metalm_jax.train import state as state_lib
from metalm_jax.train import step as step_lib
from metalm_jax.train import trainer
from tests.conftest import runlocal_config
from tests.test_config import load_config

ALPHA = 16.0


def decoder_config(method="lora", steps=4, **peft_overrides):
  """configs/decoder_lm.py:size=test (unlocked) with config.peft.method = `method`."""
  config = ml_collections.ConfigDict(load_config("decoder_lm", "size=test").to_dict())
  config.num_train_steps = steps
  config.optimizer.warmup_steps = 1
  config.optimizer.learning_rate = 1e-2
  config.peft.method = method
  config.peft.alpha = ALPHA
  for key, value in peft_overrides.items():
    config.peft[key] = value
  return config


def flat(tree) -> dict:
  return {optimizer_lib.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def batch(seed=0, rows=8, length=16):
  tokens = np.random.default_rng(seed).integers(3, 500, (rows, length)).astype(np.int32)
  return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
          "segment_ids": np.ones_like(tokens), "weights": np.ones(tokens.shape, np.float32)}


def train_steps(config, steps=4):
  """(model, rest, params before, params after `steps` real train steps, opt_state)."""
  model = state_lib.Model.from_config(config)
  tx, schedule = trainer.make_optimizer(config, model)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  state, shardings, rest = state_lib.create_train_state(model, tx, jax.random.key(0), mesh,
                                                        rules)
  before = jax.device_get(state.params)
  batch_shardings = sharding.batch_sharding(mesh, rules, ndim=1)
  step = step_lib.make_train_step(model, tx, objectives.get(config.objective), schedule,
                                  shardings, rest, batch_shardings, mesh, rules=rules)
  for i in range(steps):
    state, metrics = step(state, rest, pipeline.make_global_batch(batch(i), batch_shardings))
    assert np.isfinite(float(metrics["loss"]))
  return model, rest, before, jax.device_get(state.params), state.opt_state


@pytest.fixture(scope="module")
def lora_run():
  config = decoder_config("lora")
  return (config,) + train_steps(config)


def test_lora_trains_only_the_factors_the_base_is_bitwise_unchanged(lora_run):
  config, model, _, before, after, opt_state = lora_run
  before, after = flat(before), flat(after)
  factors = [p for p in after if peft.is_factor(p)]
  # Every attention and MLP kernel of the 2-layer decoder: 2 x (4 + 3) targets.
  assert len(factors) == 2 * len(model.lora_targets) == 2 * 2 * 7
  for path in after:
    if peft.is_factor(path):
      assert not np.array_equal(before[path], after[path]), f"{path} did not train"
    else:
      assert np.array_equal(before[path], after[path]), f"frozen {path} changed"
  assert all(np.all(before[p] == 0) for p in factors if p.endswith("lora_b"))
  # Adam's moments exist for the factors only.
  trainable = sum(x.size for p, x in after.items() if peft.is_factor(p))
  moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert moments == 2 * trainable


def test_merged_plain_model_gives_the_adapter_models_logits(lora_run):
  config, model, rest, before, after, _ = lora_run
  plain = peft.merge_lora(after, ALPHA)
  base_model = state_lib.Model(config.model)  # the original model: no factors
  assert jax.tree.structure(plain) == jax.tree.structure(base_model.abstract_params)
  assert not any(peft.is_factor(p) for p in flat(plain))
  tokens = jnp.asarray(batch(9)["inputs"])
  adapted = np.asarray(model.merge(after, rest)(tokens)[0])
  merged = np.asarray(base_model.merge(plain, rest)(tokens)[0])
  np.testing.assert_allclose(merged, adapted, rtol=1e-6, atol=1e-6)
  # ... and the trained factors matter: the base params alone give other logits.
  base_only = peft.merge_lora(before, ALPHA)  # B = 0 at init: the base kernels
  frozen = np.asarray(base_model.merge(base_only, rest)(tokens)[0])
  assert np.max(np.abs(frozen - adapted)) > 1e-3


@pytest.mark.parametrize("shape,logical", [
    ((6, 2, 3), ("embed", "heads", "head_dim")),  # query: x [T, D] -> [T, N, H]
    ((2, 3, 6), ("heads", "head_dim", "embed")),  # out: [T, N, H] -> [T, D]
    ((6, 5), ("embed", "mlp")),
    ((4, 6, 2, 3), ("layers", "embed", "heads", "head_dim")),  # scanned layers
])
def test_merged_kernel_is_the_lora_update_of_the_contracted_axes(shape, logical):
  """x . (W + s A B) == x . W + s (x . A) . B, contracting the projection's input axes."""
  num_batch, num_in = peft._split(shape, logical)
  target = peft.Target(("m", "kernel"), shape, jnp.float32, logical, num_batch, num_in)
  a_shape, b_shape = target.factor_shapes(4)
  keys = jax.random.split(jax.random.key(1), 3)
  w = jax.random.normal(keys[0], shape)
  a, b = jax.random.normal(keys[1], a_shape), jax.random.normal(keys[2], b_shape)
  merged = peft.merge_lora({"m": {"kernel": w, "lora_a": a, "lora_b": b}}, 8.0)["m"]["kernel"]
  letters = "ijkl"[:len(shape)]
  lb, li, lo = (letters[:num_batch], letters[num_batch:num_batch + num_in],
                letters[num_batch + num_in:])
  x = jax.random.normal(jax.random.key(2), (3,) + tuple(shape[:num_batch + num_in]))
  want = (jnp.einsum(f"t{lb}{li},{lb}{li}{lo}->t{lb}{lo}", x, w) + 8.0 / 4 * jnp.einsum(
      f"t{lb}r,{lb}r{lo}->t{lb}{lo}", jnp.einsum(f"t{lb}{li},{lb}{li}r->t{lb}r", x, a), b))
  got = jnp.einsum(f"t{lb}{li},{lb}{li}{lo}->t{lb}{lo}", x, merged)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  if logical == ("heads", "head_dim", "embed"):
    assert (num_in, a_shape, b_shape) == (2, (2, 3, 4), (4, 6))


def test_bitfit_trains_only_biases_and_norms():
  config = decoder_config("bitfit")
  model, _, before, after, opt_state = train_steps(config)
  before, after = flat(before), flat(after)
  trained = [p for p in after if not np.array_equal(before[p], after[p])]
  roles = {p: peft.weight_decay.no_decay_role(p) for p in after}
  assert trained and sorted(trained) == sorted(p for p, r in roles.items()
                                               if r in ("bias", "norm"))
  assert all(p.split("/")[-1] in ("scale", "bias") for p in trained)
  moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert moments == 2 * sum(after[p].size for p in trained)


def test_summary_counts_trainable_params_and_optimizer_bytes():
  config = decoder_config("lora", rank=4)
  model = state_lib.Model.from_config(config)
  tx, _ = trainer.make_optimizer(config, model)
  line = trainer.trainable_summary(config, model, tx)
  factors = sum(int(np.prod(x.shape)) for p, x in
                jax.tree_util.tree_flatten_with_path(model.abstract_params)[0]
                if peft.is_factor(optimizer_lib.path_str(p)))
  total = model.param_count()
  assert line.startswith(f"peft lora r=4: {factors:,} trainable of {total:,} params")
  # Adam's two float32 moments of the factors, plus a few scalar counters.
  kb = float(line.split("optimizer state ")[1].split(" KB")[0])
  assert abs(kb - 2 * 4 * factors / 1024) < 0.1, line
  full = decoder_config("")
  full_model = state_lib.Model.from_config(full)
  full_line = trainer.trainable_summary(full, full_model, trainer.make_optimizer(full,
                                                                                 full_model)[0])
  assert full_line.startswith(f"full finetuning: {full_model.param_count():,} trainable")


def test_factor_shardings_follow_the_kernels_axes(devices8):
  config = decoder_config("lora")
  model = state_lib.Model.from_config(config)
  specs = model.logical_specs
  q = ("blocks", 0, "attention", "query")
  o = ("blocks", 0, "attention", "out")
  assert tuple(specs[q + ("lora_a",)]) == ("embed", "lora_rank")
  assert tuple(specs[q + ("lora_b",)]) == ("lora_rank", "heads", "head_dim")
  assert tuple(specs[o + ("lora_a",)]) == ("heads", "head_dim", "lora_rank")
  assert tuple(specs[o + ("lora_b",)]) == ("lora_rank", "embed")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devices8)
  tx, _ = trainer.make_optimizer(config, model)
  abstract, shardings = state_lib.abstract_train_state(
      model, tx, jax.random.key(0), mesh, sharding.FSDP_TP_RULES)
  p = shardings.params["blocks"][0]["attention"]
  assert p["query"]["lora_a"].spec == jax.sharding.PartitionSpec("fsdp")
  assert p["query"]["lora_b"].spec == jax.sharding.PartitionSpec(None, "tensor")
  assert p["out"]["lora_b"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  # Adam's moments of a factor are sharded like the factor.
  mu = [s for path, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
        if optimizer_lib.path_str(path).endswith("query/lora_b")]
  assert mu and all(s.spec == jax.sharding.PartitionSpec(None, "tensor") for s in mu)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("key,value,message", [
    ("method", "adapter", "config.peft.method='adapter' is not a method"),
    ("rank", 0, "config.peft.rank=0 must be an int >= 1"),
    ("alpha", 0.0, "config.peft.alpha=0.0 must be a finite number > 0"),
    ("alpha", -2.0, "config.peft.alpha=-2.0 must be a finite number > 0"),
    ("targets", "(", "config.peft.targets='(' is not a valid regex"),
])
def test_bad_peft_values_are_config_errors(key, value, message):
  config = decoder_config("lora")
  config.peft[key] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    config_lib.validate(config)


def test_targets_matching_no_kernel_lists_kernel_paths():
  with pytest.raises(ConfigError, match=r"matches no kernel.*blocks/0/attention/key/kernel"):
    state_lib.Model.from_config(decoder_config("lora", targets="attention/qkv/kernel$"))
  with pytest.raises(ConfigError, match=r"matches blocks/0/attn_norm/scale.*not a projection"):
    state_lib.Model.from_config(decoder_config("lora", targets="attn_norm"))


def test_lora_where_it_cannot_apply_is_refused():
  """Every model family has attention / MLP kernels; what LoRA cannot adapt is a param that is
  not a projection kernel (Mamba's depthwise conv weight), or kernels that stay frozen anyway
  (a docked encoder frozen by trainable_encoder_layers=0)."""
  config = ml_collections.ConfigDict(load_config("hybrid_lm", "size=test").to_dict())
  config.peft.method = "lora"
  config.peft.targets = r"mamba/(in_proj|out_proj)/kernel$"  # Mamba's projections: fine
  assert len(state_lib.Model.from_config(config).lora_targets) == 2 * 3  # 3 Mamba layers
  config.peft.targets = "mamba/conv_weight"
  with pytest.raises(ConfigError, match=r"matches layers/0/mamba/conv_weight.*not a projection"):
    state_lib.Model.from_config(config)
  vl = ml_collections.ConfigDict(
      load_config("metalm_vl", "size=test,stage=finetune,peft=lora").to_dict())
  vl.model.trainable_encoder_layers = 0
  vl.peft.targets = "^text_encoder/.*/kernel$"
  with pytest.raises(ConfigError, match=r"only kernels of frozen encoder layers"):
    state_lib.Model.from_config(vl)


def test_config_argument_peft_is_for_finetuning():
  assert load_config("metalm_vl", "size=test,stage=finetune,peft=lora").peft.method == "lora"
  assert load_config("metalm_vl", "size=test,stage=finetune,peft=bitfit").peft.method == \
      "bitfit"
  with pytest.raises(ValueError, match="use it with stage=finetune"):
    load_config("metalm_vl", "size=test,peft=lora")
  with pytest.raises(ValueError, match="peft='dora'"):
    load_config("metalm_vl", "size=test,stage=finetune,peft=dora")


def test_lora_skips_kernels_of_frozen_encoder_layers():
  config = load_config("metalm_vl", "size=test,stage=finetune,peft=lora").to_dict()
  config = ml_collections.ConfigDict(config)
  all_targets = state_lib.Model.from_config(config).lora_targets
  config.model.trainable_encoder_layers = 0  # the whole docked text encoder frozen
  model = state_lib.Model.from_config(config)
  assert any(t.path[0] == "text_encoder" for t in all_targets)
  assert {t.path for t in model.lora_targets} == {
      t.path for t in all_targets if t.path[0] != "text_encoder"}
  mask = flat(trainer.trainable_params(config, model))
  assert not any(v for p, v in mask.items() if p.startswith("text_encoder/"))
  assert all(v == peft.is_factor(p) for p, v in mask.items())


# ---------------------------------------------------------------- through the trainer
def saved_params(workdir) -> dict:
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=3, async_save=False)
  state = ckpt.manager.restore(ckpt.latest_step(), args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return flat(state["params"])


@pytest.fixture(scope="module")
def pretrained(family_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vl_pre")
  config = runlocal_config("metalm_vl", "size=test", family_data_dir)
  trainer.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.mark.slow  # ~30 s each on 2 cores, plus a ~30 s pretraining run shared by both
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_metalm_vl_finetune_with_peft_from_a_pretrain_workdir(method, pretrained,
                                                              family_data_dir, tmp_path,
                                                              caplog):
  config = runlocal_config("metalm_vl", f"size=test,stage=finetune,peft={method}",
                           family_data_dir, **{"init_from.checkpoint": str(pretrained)})
  with caplog.at_level("INFO"):
    result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == config.num_train_steps and np.isfinite(result["eval_loss"])
  assert f"peft {method}" in caplog.text and "optimizer state" in caplog.text
  pre, fine = saved_params(pretrained), saved_params(tmp_path)
  for path, value in fine.items():
    if method == "lora" and peft.is_factor(path):
      assert path not in pre
      continue
    trainable = method == "bitfit" and peft.weight_decay.no_decay_role(path) in ("bias", "norm")
    if trainable:
      continue
    assert np.array_equal(pre[path], value), f"frozen {path} changed"
  changed = [p for p in fine if p in pre and not np.array_equal(pre[p], fine[p])]
  if method == "lora":
    assert not changed
    assert any(np.any(v != 0) for p, v in fine.items() if p.endswith("lora_b"))
  else:
    assert changed and all(peft.weight_decay.no_decay_role(p) in ("bias", "norm")
                           for p in changed)
  assert os.path.exists(os.path.join(tmp_path, "evals", "vqa", f"step_{config.num_train_steps}.json"))


def test_save_trainable_only_needs_a_method_and_init_from():
  config = decoder_config("lora")
  config.peft.save_trainable_only = True
  with pytest.raises(ConfigError, match=r"save_trainable_only=True .*"
                     r"config\.init_from\.checkpoint=''"):
    config_lib.validate(config)
  config.init_from.checkpoint = "/some/pretrain"
  config_lib.validate(config)
  config.peft.method = ""
  with pytest.raises(ConfigError, match=r"config\.peft\.method=''"):
    config_lib.validate(config)


@pytest.mark.slow  # three ~30 s runs on 2 cores
def test_trainable_only_checkpoints_resume_and_evaluate(pretrained, family_data_dir,
                                                        tmp_path, monkeypatch):
  """Checkpoints without the frozen base: they hold the factors alone, a resumed run reads
  the base from config.init_from and continues the same trajectory, evaluation works."""
  from metalm_jax.train import evaluate as evaluate_lib

  def config(steps, trainable_only=True):
    c = runlocal_config("metalm_vl", "size=test,stage=finetune,peft=lora", family_data_dir,
                        **{"init_from.checkpoint": str(pretrained),
                           "peft.save_trainable_only": trainable_only})
    c.num_train_steps, c.checkpoint_every_steps, c.optimizer.warmup_steps = steps, 2, 1
    return c

  full = config(6, trainable_only=False)
  trainer.train_and_evaluate(full, str(tmp_path / "full"))
  # Interrupted while fetching step 5's batch: the checkpoint of step 4 is the last one.
  fetch, calls = pipeline.make_global_batch, []

  def stop_at_step_5(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt("simulated stop")
    return fetch(*args, **kwargs)

  monkeypatch.setattr(trainer.pipeline, "make_global_batch", stop_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config(6), str(tmp_path / "part"))
  monkeypatch.undo()
  assert checkpoint_lib.Checkpointer(str(tmp_path / "part"), keep=3).latest_step() == 4
  saved = saved_params(tmp_path / "part")
  assert saved and all(peft.is_factor(p) for p in saved)
  result = trainer.train_and_evaluate(config(6), str(tmp_path / "part"))
  assert result["step"] == 6
  straight, resumed = saved_params(tmp_path / "full"), saved_params(tmp_path / "part")
  for path, value in resumed.items():
    np.testing.assert_allclose(value, straight[path], rtol=1e-5, atol=1e-6, err_msg=path)
  scores = evaluate_lib.evaluate(config(6), str(tmp_path / "part"), names=("eval",))
  np.testing.assert_allclose(scores["evals"]["eval"]["loss"], result["evals"]["eval"]["loss"],
                             rtol=1e-5)


def params_at(workdir, step) -> dict:
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=3, async_save=False)
  state = ckpt.manager.restore(step, args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  return flat(state["params"])


@pytest.mark.slow  # one short run per family (~20-40 s each on 2 cores)
@pytest.mark.parametrize("name,arg", [
    ("decoder_lm", ""), ("hybrid_lm", "size=test"), ("metalm_lm", "size=test"),
    ("metalm_multitask", "size=test"), ("mplug", "size=test"),  # pretraining: momentum
    ("mplug", "size=test,stage=vqa")])
def test_lora_trains_through_every_family(name, arg, family_data_dir, tmp_path):
  config = runlocal_config(name, arg, family_data_dir, **{"peft.method": "lora"})
  config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 3, 1, 1
  config.optimizer.warmup_steps = 1
  config.evals = ml_collections.ConfigDict({"eval": {"type": "loss"}})
  config.sample.max_new_tokens = 0
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 3 and np.isfinite(result["eval_loss"])
  first, last = params_at(tmp_path, 1), params_at(tmp_path, 3)
  factors = [p for p in last if peft.is_factor(p)]
  assert factors
  changed = {p for p in last if not np.array_equal(first[p], last[p])}
  assert changed and changed <= set(factors), sorted(changed - set(factors))
  # Every factor the loss reaches trains (mPLUG pretraining leaves its seq2seq decoder out).
  unused = ("decoder/",) if (name, arg) == ("mplug", "size=test") else ()
  assert {p for p in factors if not p.startswith(unused)} <= changed | {
      p for p in factors if p.endswith("lora_a")}  # A moves from step 2 on (B = 0 at step 1)
