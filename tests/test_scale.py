"""Layer scanning and rematerialisation: same numbers, less compiled code, fewer residuals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.inference import generate
from metalm_jax.models import decoder as decoder_lib
from metalm_jax.models.hybrid import HybridDecoder

KW = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


def _functional(model):
  """(graphdef, abstract param state) -> f(pure params) = mean logits."""
  graphdef, state = nnx.split(model, nnx.Param)

  def f(params):
    fresh = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(fresh, params)
    return nnx.merge(graphdef, fresh)(TOKENS)[0].mean()

  return f, state.to_pure_dict()


def test_scanned_decoder_equals_the_unrolled_one_for_every_remat_policy():
  reference = decoder_lib.Decoder(num_layers=3, **KW, rngs=nnx.Rngs(0))
  f, params = _functional(reference)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(f))(params)
  ref_grads = decoder_lib.stack_layer_params(ref_grads)
  stacked = decoder_lib.stack_layer_params(params)
  assert jax.tree.leaves(stacked["blocks"])[0].shape[0] == 3
  for policy in decoder_lib.REMAT_POLICIES:
    for scan in (False, True):
      model = decoder_lib.Decoder(num_layers=3, scan_layers=scan, remat_policy=policy, **KW,
                                  rngs=nnx.Rngs(0))
      g, p = _functional(model)
      inputs = stacked if scan else params
      loss, grads = jax.jit(jax.value_and_grad(g))(inputs)
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)  # f32 sums in another order
      grads = grads if scan else decoder_lib.stack_layer_params(grads)
      for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"{policy} scan={scan}")
  roundtrip = decoder_lib.unstack_layer_params(stacked)
  for a, b in zip(jax.tree.leaves(roundtrip), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_scanned_parameters_carry_a_layers_axis():
  model = nnx.eval_shape(lambda: decoder_lib.Decoder(num_layers=4, scan_layers=True, **KW,
                                                     rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param)).to_pure_dict()
  assert tuple(specs["blocks"]["mlp"]["wi"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["blocks"]["attention"]["query"]["kernel"]) == (
      "layers", "embed", "heads", "head_dim")
  assert tuple(specs["embedder"]["embedding"]) == ("vocab", "embed")  # not stacked


def test_scanned_decode_and_generation_match_the_unrolled_decoder():
  unrolled = decoder_lib.Decoder(num_layers=2, **KW, rngs=nnx.Rngs(0))
  scanned = decoder_lib.Decoder(num_layers=2, scan_layers=True, **KW, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, decoder_lib.stack_layer_params(
      nnx.state(unrolled, nnx.Param).to_pure_dict()))
  scanned = nnx.merge(graphdef, state)
  cache = scanned.init_cache(2, 20)
  assert cache["layers"]["k"].shape == (2, 2, 20, 2, 8)  # batch first, then layers
  out_u = generate(unrolled, TOKENS[:, :5], max_new_tokens=6, rng=jax.random.key(0))
  out_s = generate(scanned, TOKENS[:, :5], max_new_tokens=6, rng=jax.random.key(0))
  np.testing.assert_array_equal(out_u, out_s)


def test_scanned_dropout_differs_per_layer_and_per_key():
  model = decoder_lib.Decoder(num_layers=2, scan_layers=True, dropout_rate=0.5, **KW,
                              rngs=nnx.Rngs(0))
  a = model(TOKENS, deterministic=False, rngs=jax.random.key(1))[0]
  b = model(TOKENS, deterministic=False, rngs=jax.random.key(1))[0]
  c = model(TOKENS, deterministic=False, rngs=jax.random.key(2))[0]
  d = model(TOKENS)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)


def _saved_bytes(model) -> int:
  """Bytes the backward pass keeps: the residuals held by the VJP closure."""
  f, params = _functional(model)
  residuals = jax.eval_shape(lambda p: jax.vjp(f, p)[1], params)  # shapes only, no compute
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(residuals))


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_save_less_for_the_backward_pass(scan):
  saved = {policy: _saved_bytes(decoder_lib.Decoder(
      num_layers=3, scan_layers=scan, remat_policy=policy, **KW, rngs=nnx.Rngs(0)))
           for policy in decoder_lib.REMAT_POLICIES}
  assert saved["full"] < saved["names"] < saved["none"], saved
  assert saved["full"] < saved["dots_saveable"] < saved["none"], saved


def test_hybrid_remat_keeps_the_gradients():
  kw = dict(KW, num_layers=4, schedule="AMMM", d_state=4)
  f, params = _functional(HybridDecoder(**kw, rngs=nnx.Rngs(0)))
  g, _ = _functional(HybridDecoder(**kw, remat_policy="full", rngs=nnx.Rngs(0)))
  grad_f, grad_g = jax.jit(jax.grad(f))(params), jax.jit(jax.grad(g))(params)
  for a, b in zip(jax.tree.leaves(grad_f), jax.tree.leaves(grad_g)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert _saved_bytes(HybridDecoder(**kw, remat_policy="full", rngs=nnx.Rngs(0))) < \
      _saved_bytes(HybridDecoder(**kw, rngs=nnx.Rngs(0)))


def test_scanned_program_does_not_grow_with_depth():
  """One compiled block for N layers: the lowered program's size is flat in depth."""
  def hlo_size(num_layers, scan):
    model = decoder_lib.Decoder(num_layers=num_layers, scan_layers=scan, **KW, rngs=nnx.Rngs(0))
    f, params = _functional(model)
    return len(jax.jit(jax.grad(f)).lower(params).as_text())
  scanned = [hlo_size(n, True) for n in (2, 8)]
  unrolled = [hlo_size(n, False) for n in (2, 8)]
  assert scanned[1] < 1.1 * scanned[0], scanned
  assert unrolled[1] > 2.5 * unrolled[0], unrolled


def test_bad_remat_policy_and_scanned_permutation_lm_are_clear_errors():
  with pytest.raises(ValueError, match="remat_policy='dots'.*one of"):
    decoder_lib.Decoder(num_layers=2, remat_policy="dots", **KW, rngs=nnx.Rngs(0))
  from metalm_jax.objectives import permutation_lm
  model = decoder_lib.Decoder(num_layers=2, scan_layers=True, **KW, rngs=nnx.Rngs(0))
  zeros = jnp.zeros_like(TOKENS)
  with pytest.raises(ValueError, match="scan_layers=False"):
    permutation_lm.two_stream(model, TOKENS, positions=zeros, perm_rank=zeros,
                              segment_ids=zeros + 1)
