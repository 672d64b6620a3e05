"""PPLM steering: the bag's probability mass rises against unsteered decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.data import tokenizers
from metalm_jax.inference import generate, pplm
from metalm_jax.models.decoder import Decoder


@pytest.fixture(scope="module")
def model():
  return Decoder(vocab_size=97, d_model=16, num_layers=2, num_heads=2, d_ff=26,
                 rngs=nnx.Rngs(0))


PROMPT = jnp.array([[1, 5, 9, 11], [1, 7, 3, 2]], jnp.int32)
BAG = jnp.array([10, 20, 30, 40, 50], jnp.int32)


def test_no_iterations_is_plain_greedy_decoding(model):
  tokens, info = pplm.generate(model, PROMPT, BAG, max_new_tokens=6, num_iterations=0)
  np.testing.assert_array_equal(tokens, generate(model, PROMPT, max_new_tokens=6,
                                                 rng=jax.random.key(0)))
  np.testing.assert_allclose(info["bag_mass"], info["clean_bag_mass"], rtol=1e-5)


def test_steering_raises_the_bag_probability_mass(model):
  _, plain = pplm.generate(model, PROMPT, BAG, max_new_tokens=6, num_iterations=0)
  _, steered = pplm.generate(model, PROMPT, BAG, max_new_tokens=6, num_iterations=3,
                             step_size=0.05)
  plain_mass = float(plain["bag_mass"].mean())
  steered_mass = float(steered["bag_mass"].mean())
  assert steered_mass > 1.2 * plain_mass, (steered_mass, plain_mass)
  # per step too: the fused distribution puts more mass on the bag than the clean model
  assert (steered["bag_mass"] > steered["clean_bag_mass"]).mean() > 0.9


def test_bag_of_words_keeps_single_token_words():
  tok = tokenizers.ByteTokenizer()
  np.testing.assert_array_equal(pplm.bag_of_words(tok, ["a", "b", "word"]),
                                sorted(tok.encode("ab").tolist()))
  with pytest.raises(ValueError, match="single token"):
    pplm.bag_of_words(tok, ["long words"])
