"""Activation sharding constraints: a no-op outside a step, each device's own rows under fsdp.

Without them XLA's propagation follows the fsdp-sharded weights: every device computed the
logits of its whole fsdp group (docs/benchmarks.md, AOT section). The compiled-HLO test
below fails when `make_train_step` gets `rules=None`.
"""
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from metalm_jax import config as config_lib
from metalm_jax import objectives, sharding
from metalm_jax.train import state as state_lib
from metalm_jax.train import optimizer as optimizer_lib
from metalm_jax.train import step as step_lib

BATCH, LENGTH, VOCAB = 8, 32, 256  # d_model 32: the head kernel is one row's logits


def test_constrain_activation_is_a_no_op_outside_a_step():
  x = jnp.ones((2, 3, 4))
  assert sharding.constrain_activation(x, ("activation_batch", None, None)) is x
  with sharding.activation_sharding(None, None):  # rules=None: switched off
    assert sharding.constrain_activation(x, ("activation_batch", None, None)) is x


def test_activation_spec(devices8):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices8)
  rules = sharding.FSDP_TP_RULES
  residual = ("activation_batch", "activation_length", "activation_embed")
  assert sharding.activation_spec(residual, rules, mesh, (8, 5, 6)) == P(("data", "fsdp"),
                                                                         None, None)
  logits = ("activation_batch", "activation_length", "activation_vocab")
  assert sharding.activation_spec(logits, rules, mesh, (8, 5, 6)) == P(("data", "fsdp"),
                                                                       None, "tensor")
  # A batch the mesh does not divide, and a name no rule mentions: left to the compiler.
  assert sharding.activation_spec(logits, rules, mesh, (2, 5, 6)) == P(
      P.UNCONSTRAINED, None, "tensor")
  assert sharding.activation_spec(("batch_of_nothing",), rules, mesh, (8,)) is None
  assert sharding.activation_spec(residual, (("embed", "fsdp"),), mesh, (8, 5, 6)) is None


def _compiled_fsdp_step(rules):
  """The real train step of a 2-layer scanned decoder on an 8-way fsdp mesh, compiled from
  abstract arguments (nothing runs)."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
  model = state_lib.Model(ml_collections.ConfigDict(dict(
      name="decoder", vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, d_ff=64,
      max_len=LENGTH, scan_layers=True)))
  opt = config_lib.base_config().optimizer
  tx = optimizer_lib.make_optimizer(opt, 10)

  def init(key):
    params, _ = model.init(key)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), rng=jax.random.key_data(key),
                                nonfinite_skips=jnp.zeros((), jnp.int32))

  key = jax.random.key(0)
  abstract = jax.eval_shape(init, key)
  shardings = sharding.state_shardings(abstract, model.logical_specs, mesh,
                                       sharding.FSDP_RULES)
  rest = jax.eval_shape(lambda k: model.init(k)[1], key)
  batch_sharding = sharding.batch_sharding(mesh, sharding.FSDP_RULES)
  ints = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
  batch = dict(inputs=ints, targets=ints, positions=ints, segment_ids=ints,
               weights=jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.float32))
  step = step_lib.make_train_step(model, tx, objectives.get("causal_lm"),
                                  optimizer_lib.learning_rate_schedule(opt, 10), shardings, rest,
                                  batch_sharding, mesh, rules=rules)
  return step.lower(abstract, rest, batch).compile()


def test_fsdp_step_computes_only_its_own_rows_logits(devices8):
  compiled = _compiled_fsdp_step(sharding.FSDP_RULES)
  shapes = {tuple(int(d) for d in m.group(1).split(","))
            for m in re.finditer(r"f32\[([\d,]+)\]", compiled.as_text())}
  vocab_shapes = {s for s in shapes if s[-1] == VOCAB and len(s) > 1}
  # Per device: at most the logits of its own row (1 of 8; the all-gathered head kernel
  # [32, 256] is as big). Without the constraints XLA contracted over the fsdp-sharded
  # embed axis and held the logits of the whole batch, f32[256, 256].
  largest = max(math.prod(s) for s in vocab_shapes)
  assert largest <= LENGTH * VOCAB, sorted(vocab_shapes)
