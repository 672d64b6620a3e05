"""Weight decay by name / role (train.weight_decay), on every model family's parameter tree,
and through `make_optimizer`: the SSM's A_log / D / dt bias, norms, biases and embeddings are
never decayed; weight matrices are."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metalm_jax import config as config_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import state as state_lib
from metalm_jax.train import weight_decay
from tests.test_config import load_config

# family -> (config, arg, {path regex: decays?}); each regex must match at least one parameter.
FAMILIES = {
    "decoder": ("decoder_lm", "size=test", {
        r"^blocks/0/mlp/wi/kernel$": True, r"^blocks/0/attention/query/kernel$": True,
        r"^head/kernel$": True, r"^embedder/embedding$": False,
        r"^blocks/0/attn_norm/scale$": False, r"^final_norm/scale$": False}),
    "hybrid": ("hybrid_lm", "size=test", {
        r"/mamba/A_log$": False, r"/mamba/D$": False, r"/mamba/dt_proj/bias$": False,
        r"/mamba/conv_bias$": False, r"/mamba/in_proj/kernel$": True,
        r"/mamba/x_proj/kernel$": True, r"/mamba/dt_proj/kernel$": True,
        r"/mamba/out_proj/kernel$": True, r"/mamba/conv_weight$": True,
        r"/mixer_norm/scale$": False, r"^embedder/embedding$": False}),
    "hybrid_mamba2": ("hybrid_lm", "size=test,mamba=2", {
        r"/mamba2/A_log$": False, r"/mamba2/D$": False, r"/mamba2/dt_bias$": False,
        r"/mamba2/norm_weight$": False, r"/mamba2/in_proj/kernel$": True,
        r"/mamba2/out_proj/kernel$": True}),
    "metalm_lm": ("metalm_lm", "size=test", {
        r"^text_encoder/layers/0/attention/key/bias$": False,  # [heads, head_dim]: 2-D
        r"^text_encoder/word_embeddings/embedding$": False,
        r"^decoder/embedder/embedding$": False, r"^decoder/head/kernel$": True,
        r"^text_encoder/layers/0/ffn/wi/kernel$": True}),
    "metalm_vl": ("metalm_vl", "size=tiny", {
        r"^vision_encoder/positions$": False, r"^vision_encoder/cls$": False,
        r"^vision_encoder/patch_embedding/kernel$": True,
        r"^vision_encoder/patch_embedding/bias$": False}),
    "mplug": ("mplug", "size=tiny", {
        r"^decoder/positions/embedding$": False, r"^text_encoder/position_embeddings/":
        False, r"^itm_head/kernel$": True, r"^itm_head/bias$": False,
        r"^fusion/layers/0/.*norm/scale$": False, r"^temperature$": False}),
}


def abstract_params(config_name, arg):
  return state_lib.Model(load_config(config_name, arg).model).abstract_params


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decay_mask_by_role_on_every_family(family):
  config_name, arg, expected = FAMILIES[family]
  params = abstract_params(config_name, arg)
  mask = weight_decay.decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  flat = {weight_decay._path_str(p): (bool(m), x.shape) for (p, m), (_, x) in zip(
      jax.tree_util.tree_flatten_with_path(mask)[0],
      jax.tree_util.tree_flatten_with_path(params)[0])}
  for pattern, decays in expected.items():
    hits = {k: v for k, v in flat.items() if re.search(pattern, k)}
    assert hits, f"{family}: no parameter matches {pattern!r}"
    wrong = {k: v[1] for k, v in hits.items() if v[0] != decays}
    assert not wrong, f"{family}: {pattern!r} should {'' if decays else 'not '}decay: {wrong}"
  # No vector or scalar ever decays; every decayed parameter is a weight by name.
  assert not any(d for d, shape in flat.values() if len(shape) < 2)
  assert any(d for d, _ in flat.values()) and not all(d for d, _ in flat.values())
  lines = weight_decay.explain(params)
  assert len(lines) == len(flat) and sum(l.endswith("-> decay") for l in lines) == sum(
      d for d, _ in flat.values())


def test_no_decay_roles_and_masked_trees():
  role = weight_decay.no_decay_role
  assert role("layers/3/mamba/A_log").startswith("SSM") and role("x/mamba2/dt_bias").startswith(
      "SSM")
  assert role("blocks/0/attn_norm/scale") == "norm" and role("a/attention/key/bias") == "bias"
  assert role("decoder/embedder/embedding") == "token / position embedding"
  assert role("blocks/0/mlp/wo/kernel") is None and role("layers/0/mamba/conv_weight") is None
  assert role("layers/0/mamba/Dense/kernel") is None  # 'D' only as a whole component
  assert not weight_decay.decays("head/kernel", 1) and weight_decay.decays("head/kernel", 2)
  import optax  # a MaskedNode (optax.multi_transform's frozen leaves) is skipped
  tree = {"a": {"kernel": jnp.zeros((2, 3)), "A_log": jnp.zeros((2, 3))},
          "b": optax.MaskedNode()}
  assert weight_decay.decay_mask(tree)["a"] == {"kernel": True, "A_log": False}


def test_make_optimizer_leaves_ssm_dynamics_undecayed():
  """Two AdamW steps with zero gradients: only weight decay moves parameters (the first
  step's learning rate is 0, warmup). A_log [d_inner, d_state] is 2-D, so the previous
  `ndim >= 2` rule decayed it towards A = -1; now it stays, the projections shrink."""
  config = load_config("hybrid_lm", "size=test")
  model = state_lib.Model(config.model)
  params, _ = jax.jit(model.init)(jax.random.key(0))
  opt = ml_collections.ConfigDict(config_lib.base_config().optimizer.to_dict())
  opt.warmup_steps, opt.weight_decay, opt.learning_rate = 1, 0.5, 0.1
  tx = optimizer_lib.make_optimizer(opt, num_train_steps=10)

  @jax.jit
  def two_steps(params):
    opt_state, new = tx.init(params), params
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):
      updates, opt_state = tx.update(zeros, opt_state, new)
      new = jax.tree.map(lambda p, u: p + u, new, updates)
    return new

  new = two_steps(params)
  layer = next(k for k in params["layers"] if "mamba" in params["layers"][k])
  old_m, new_m = params["layers"][layer]["mamba"], new["layers"][layer]["mamba"]
  for name in ("A_log", "D", "conv_bias"):
    np.testing.assert_array_equal(new_m[name], old_m[name], err_msg=name)
  np.testing.assert_array_equal(new_m["dt_proj"]["bias"], old_m["dt_proj"]["bias"])
  np.testing.assert_array_equal(new["embedder"]["embedding"], params["embedder"]["embedding"])
  np.testing.assert_allclose(new_m["in_proj"]["kernel"], old_m["in_proj"]["kernel"] * (1 - 0.05),
                             rtol=1e-5)
