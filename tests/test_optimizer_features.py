"""Gradient accumulation, per-module learning rates, freezing by config and mixed precision.

Pure-function tests drive `state.make_optimizer` on a hand-written model (a dict of arrays
and a loss); the trainer tests run the 6-to-10-step test config on the bundled corpus.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalm_jax import config as config_lib
from metalm_jax import objectives
from metalm_jax.data import pipeline
from metalm_jax.train import optimizer as freeze
from metalm_jax.train import checkpoint as checkpoint_lib
from metalm_jax.train import metrics as metrics_lib
from metalm_jax.train import state as state_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import trainer
from tests.conftest import tiny_config
from tests.test_train import _StopAt


# ---------------------------------------------------------------- a hand-written model
def toy_params(seed=0):
  """A 2-layer MLP whose paths look like a decoder's ('blocks/0/w', 'head/kernel', ...)."""
  ks = jax.random.split(jax.random.key(seed), 5)
  return {"embedder": {"embedding": jax.random.normal(ks[0], (6, 4))},
          "blocks": {0: {"w": jax.random.normal(ks[1], (4, 8)) * 0.5, "b": jnp.zeros((8,))},
                     1: {"w": jax.random.normal(ks[2], (8, 4)) * 0.5, "b": jnp.zeros((4,))}},
          "head": {"kernel": jax.random.normal(ks[3], (4, 3)) * 0.5}}


def toy_loss(params, batch):
  """Mean squared error of an MLP over the batch (every example weighs the same)."""
  x = params["embedder"]["embedding"][batch["ids"]]
  h = jnp.tanh(x @ params["blocks"][0]["w"] + params["blocks"][0]["b"])
  h = jnp.tanh(h @ params["blocks"][1]["w"] + params["blocks"][1]["b"])
  return jnp.mean((h @ params["head"]["kernel"] - batch["y"]) ** 2)


def toy_batch(seed, size):
  ks = jax.random.split(jax.random.key(100 + seed))
  return {"ids": jax.random.randint(ks[0], (size,), 0, 6),
          "y": jax.random.normal(ks[1], (size, 3))}


def opt_config(**overrides):
  c = config_lib.base_config().optimizer
  c.learning_rate, c.warmup_steps, c.grad_clip_norm = 0.05, 2, 0.5
  for k, v in overrides.items():
    c[k] = v
  return c


def run_updates(tx, params, batches):
  """Applies `tx` once per batch; returns the final params, state and per-step params."""
  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(toy_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state, history = tx.init(params), []
  for batch in batches:
    params, opt_state = step(params, opt_state, batch)
    history.append(params)
  return params, opt_state, history


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


# ---------------------------------------------------------------- gradient accumulation
def test_accumulated_micro_batches_equal_one_big_batch():
  k, b, updates = 4, 3, 5
  big = [toy_batch(i, k * b) for i in range(updates)]
  micro = [jax.tree.map(lambda x: x[j * b:(j + 1) * b], batch) for batch in big for j in range(k)]
  plain = optimizer_lib.make_optimizer(opt_config(warmup_steps=2), updates)
  # Step counts (num_train_steps, warmup_steps) count micro-batches under accumulation.
  acc_config = opt_config(warmup_steps=2 * k, grad_accum_steps=k)
  accum = optimizer_lib.make_optimizer(acc_config, updates * k)

  p_plain, _, hist_plain = run_updates(plain, toy_params(), big)
  p_accum, _, hist_accum = run_updates(accum, toy_params(), micro)
  assert_trees_close(p_accum, p_plain, rtol=1e-5, atol=1e-6)
  for u in range(updates):  # every update agrees; micro-steps between leave params alone
    assert_trees_close(hist_accum[u * k + k - 1], hist_plain[u], rtol=1e-5, atol=1e-6)
    for j in range(k - 1):
      before = toy_params() if u == 0 else hist_accum[u * k - 1]
      jax.tree.map(np.testing.assert_array_equal, hist_accum[u * k + j], before)
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, p_plain, toy_params()))

  # The logged rate at micro-step s is the one its group's update uses: plain's at s // k.
  plain_lr = optimizer_lib.learning_rate_schedule(opt_config(warmup_steps=2), updates)
  accum_lr = optimizer_lib.learning_rate_schedule(acc_config, updates * k)
  steps = jnp.arange(updates * k)
  np.testing.assert_allclose(accum_lr(steps), plain_lr(steps // k), rtol=1e-6)


@pytest.mark.parametrize("value,match", [
    (0, r"grad_accum_steps=0 must be a positive int"),
    (True, r"grad_accum_steps=True has type bool; expected int"),
    (4, r"num_train_steps=6 is not a multiple of config\.optimizer\.grad_accum_steps=4.*"
        r"num_train_steps=8"),
])
def test_bad_grad_accum_steps_is_a_config_error(value, match):
  config = ml_collections.ConfigDict(tiny_config("").to_dict())
  with config.optimizer.ignore_type():
    config.optimizer.grad_accum_steps = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)
  if value == 4:
    with pytest.raises(config_lib.ConfigError, match="not a multiple"):
      optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)


def saved_state(workdir, step=None):
  """The checkpointed train state (as orbax restores it without a target), flattened to
  {'params/head/kernel': array, 'opt_state/.../mini_step': ...} and its step."""
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10, async_save=False)
  step = step or ckpt.latest_step()
  state = ckpt.manager.restore(step, args=checkpoint_lib.ocp.args.Composite(
      state=checkpoint_lib.ocp.args.StandardRestore()))["state"]
  ckpt.close()
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {checkpoint_lib._path_str(p): np.asarray(x) for p, x in flat}


def test_trainer_with_accumulation_finishes_and_resumes_mid_accumulation(
    pydoc_data_dir, tmp_path, monkeypatch):
  # Checkpoints at steps 3 and 6: step 3 is the first micro-batch of the 2nd update.
  overrides = {"optimizer.grad_accum_steps": 2, "checkpoint_every_steps": 3,
               "eval_every_steps": 100, "sample.max_new_tokens": 0}
  config = tiny_config(pydoc_data_dir, **overrides)
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  result = trainer.train_and_evaluate(config, straight_dir)
  assert result["step"] == 6 and np.isfinite(result["eval_loss"])
  train = metrics_lib.read_metrics(straight_dir, "train")
  lrs = [r["learning_rate"] for r in train]
  assert lrs[0] == lrs[1] and lrs[2] == lrs[3] and lrs[4] == lrs[5] and lrs[2] > 0

  mid = saved_state(straight_dir, 3)
  (mini_step,) = [v for k, v in mid.items() if k.endswith("mini_step")]
  assert int(mini_step) == 1  # one micro-batch's gradient accumulated, not yet applied
  assert any(k.startswith("opt_state") and "acc_grads" in k for k in mid)

  monkeypatch.setattr(trainer.pipeline, "make_global_batch",
                      _StopAt(5, pipeline.make_global_batch))  # fetching step 5's batch
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, resumed_dir)
  monkeypatch.undo()
  assert checkpoint_lib.Checkpointer(resumed_dir, keep=3).latest_step() == 3
  assert trainer.train_and_evaluate(config, resumed_dir)["step"] == 6

  resumed = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(resumed_dir, "train")}
  for r in train[3:]:
    np.testing.assert_allclose(resumed[r["step"]], r["loss"], rtol=1e-6)
  final_straight, final_resumed = saved_state(straight_dir), saved_state(resumed_dir)
  assert final_straight.keys() == final_resumed.keys()
  for key, value in final_straight.items():
    np.testing.assert_allclose(final_resumed[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


# ---------------------------------------------------------------- freezing and multipliers
def test_frozen_params_are_bitwise_unchanged_and_get_no_optimizer_state():
  config = opt_config(freeze=(r"^embedder/", r"^blocks/0/"), weight_decay=0.5)
  tx = optimizer_lib.make_optimizer(config, 10, toy_params())
  start = toy_params()
  params, opt_state, _ = run_updates(tx, start, [toy_batch(i, 8) for i in range(4)])
  for path in ("embedder/embedding", "blocks/0/w", "blocks/0/b"):
    a, b = (dict(zip(freeze.param_paths(t), jax.tree.leaves(t)))[path] for t in (params, start))
    np.testing.assert_array_equal(a, b, err_msg=path)  # no update, no weight decay
  for path in ("blocks/1/w", "head/kernel"):
    a, b = (dict(zip(freeze.param_paths(t), jax.tree.leaves(t)))[path] for t in (params, start))
    assert not np.allclose(a, b), path
  # Adam's moments exist for the trained leaves only: 3 of 5 parameters, twice (mu and nu).
  state_shapes = sorted(x.shape for x in jax.tree.leaves(opt_state) if x.ndim)
  assert state_shapes == sorted(2 * [(8, 4), (4,), (4, 3)])


def test_config_freeze_combines_with_a_trainable_mask():
  params = toy_params()
  mask = jax.tree_util.tree_map_with_path(lambda p, _: freeze.path_str(p) != "head/kernel",
                                          params)
  tx = optimizer_lib.make_optimizer(opt_config(freeze=("^embedder/",)), 10, params, trainable=mask)
  new, _, _ = run_updates(tx, params, [toy_batch(0, 8), toy_batch(1, 8)])
  moved = {p: not np.array_equal(a, b) for p, a, b in zip(
      freeze.param_paths(params), jax.tree.leaves(new), jax.tree.leaves(params))}
  assert moved == {"blocks/0/b": True, "blocks/0/w": True, "blocks/1/b": True,
                   "blocks/1/w": True, "embedder/embedding": False, "head/kernel": False}


def test_lr_multiplier_scales_the_whole_update():
  params, grads = toy_params(), jax.grad(toy_loss)(toy_params(), toy_batch(0, 8))
  plain = optimizer_lib.make_optimizer(opt_config(), 10)
  # First match wins: '^blocks/1/' takes blocks/1 before the catch-all '^blocks/'.
  scaled = optimizer_lib.make_optimizer(
      opt_config(lr_multipliers=((r"^head/", 0.5), (r"^blocks/1/", 0.0), (r"^blocks/", 2))), 10,
      params)
  s_plain, s_scaled = plain.init(params), scaled.init(params)
  for _ in range(2):  # the first update has learning rate 0 (warmup from 0); use the second
    u_plain, s_plain = jax.jit(plain.update)(grads, s_plain, params)
    u_scaled, s_scaled = jax.jit(scaled.update)(grads, s_scaled, params)
  assert float(optax.tree.norm(u_plain["head"])) > 0
  np.testing.assert_array_equal(u_scaled["head"]["kernel"], 0.5 * u_plain["head"]["kernel"])
  np.testing.assert_array_equal(u_scaled["blocks"][0]["w"], 2 * u_plain["blocks"][0]["w"])
  np.testing.assert_array_equal(u_scaled["blocks"][1]["w"], 0 * u_plain["blocks"][1]["w"])
  np.testing.assert_array_equal(u_scaled["embedder"]["embedding"],
                                u_plain["embedder"]["embedding"])


def test_unmatched_pattern_is_a_config_error_listing_real_paths():
  params = toy_params()
  with pytest.raises(config_lib.ConfigError) as e:
    optimizer_lib.make_optimizer(opt_config(freeze=("^embedder/", "^encoder/")), 10, params)
  message = str(e.value)
  assert "config.optimizer.freeze[1]='^encoder/' matches no parameter" in message
  assert "'embedder', 'head'" in message and "embedder/embedding" in message
  # Also without params up front: the check runs when the optimizer state is built.
  tx = optimizer_lib.make_optimizer(opt_config(lr_multipliers=(("^hed/", 0.5),)), 10)
  with pytest.raises(config_lib.ConfigError, match=r"lr_multipliers\[0\]='\^hed/' matches no"):
    tx.init(params)
  # A pattern that only matches what an earlier one took would be ignored: also an error.
  with pytest.raises(config_lib.ConfigError, match=r"freeze\[1\]='blocks/0/w'.*earlier"):
    optimizer_lib.make_optimizer(opt_config(freeze=("^blocks/", "blocks/0/w")), 10, params)


@pytest.mark.parametrize("key,value,match", [
    ("freeze", ("[unclosed",), r"freeze\[0\]='\[unclosed' is not a valid regex"),
    ("freeze", (3,), r"freeze\[0\]=3 must be a regex string"),
    ("lr_multipliers", (("^head/",),), r"lr_multipliers\[0\]=\('\^head/',\) must be a"),
    ("lr_multipliers", (("^head/", -1.0),), r"multiplier >= 0"),
])
def test_malformed_optimizer_patterns_are_config_errors(key, value, match):
  config = ml_collections.ConfigDict(tiny_config("").to_dict())
  config.optimizer[key] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_trainer_rejects_a_freeze_pattern_matching_nothing(pydoc_data_dir, tmp_path):
  config = tiny_config(pydoc_data_dir, **{"optimizer.freeze": ("^encoder/",)})
  with pytest.raises(config_lib.ConfigError, match=r"'\^encoder/' matches no parameter.*"
                     r"'blocks', 'embedder', 'final_norm', 'head'"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_trainer_freezes_and_scales_by_config(pydoc_data_dir, tmp_path):
  config = tiny_config(pydoc_data_dir, **{
      "optimizer.freeze": (r"^embedder/", r"^blocks/0/attention/"),
      "optimizer.lr_multipliers": ((r"^head/", 0.5),), "eval_every_steps": 100,
      "sample.max_new_tokens": 0})
  workdir = str(tmp_path)
  assert trainer.train_and_evaluate(config, workdir)["step"] == 6
  early, final = saved_state(workdir, 2), saved_state(workdir, 6)
  frozen = [k for k in final if k.startswith(("params/embedder/", "params/blocks/0/attention/"))]
  assert len(frozen) == 5
  for key in frozen:  # unchanged from step 2 (the first update has learning rate 0) to 6
    np.testing.assert_array_equal(final[key], early[key], err_msg=key)
  for key in ("params/head/kernel", "params/blocks/1/attention/query/kernel",
              "params/blocks/0/mlp/wo/kernel"):
    assert not np.array_equal(final[key], early[key]), key
  assert not any("embedder" in k for k in final if k.startswith("opt_state"))


# ---------------------------------------------------------------- mixed precision
def test_bfloat16_compute_float32_params_trains(pydoc_data_dir, tmp_path):
  config = tiny_config(pydoc_data_dir, **{
      "model.dtype": "bfloat16", "model.param_dtype": "float32", "num_train_steps": 10,
      "checkpoint_every_steps": 5, "eval_every_steps": 10, "sample.max_new_tokens": 0})
  result = trainer.train_and_evaluate(config, str(tmp_path))
  losses = [r["loss"] for r in metrics_lib.read_metrics(str(tmp_path), "train")]
  assert len(losses) == 10 and np.all(np.isfinite(losses)) and np.isfinite(result["eval_loss"])
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses

  state = saved_state(str(tmp_path))
  floats = {k: v.dtype for k, v in state.items() if np.issubdtype(v.dtype, np.floating)
            or v.dtype == jnp.bfloat16}
  assert {str(d) for k, d in floats.items() if k.startswith("params/")} == {"float32"}
  assert {str(d) for k, d in floats.items() if k.startswith("opt_state/")} == {"float32"}

  # A forward / backward pass of the trained model: bf16 activations, f32 logits, loss, grads.
  model = state_lib.Model(config.model)
  params = {k[len("params/"):]: v for k, v in state.items() if k.startswith("params/")}
  params = jax.tree_util.tree_map_with_path(
      lambda p, _: jnp.asarray(params[freeze.path_str(p)]), model.abstract_params)
  rest = model.init(jax.random.key(0))[1]
  tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 500 + 3
  logits, aux = jax.jit(lambda p: model.merge(p, rest)(tokens))(params)
  assert aux["hidden"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
           "segment_ids": jnp.ones_like(tokens), "weights": jnp.ones(tokens.shape, jnp.float32)}
  loss_fn = lambda p: objectives.get("causal_lm").loss(model.merge(p, rest), batch)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
