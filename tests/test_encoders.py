"""Text encoder, ViT and connectors: shapes, bidirectionality, padding, positions, sharding names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalm_jax.models.connector import Connector
from metalm_jax.models.text_encoder import TextEncoder, relative_position_buckets
from metalm_jax.models.vision_encoder import VisionEncoder, interpolate_positions, patchify


@nnx.jit
def _encode(enc, tokens, valid):
  return enc(tokens, valid=valid)


@nnx.jit
def _see(vit, images):
  return vit(images)


@nnx.jit
def _connect(conn, x, valid):
  return conn(x, valid=valid)


def _text_encoder(**kw):
  args = dict(vocab_size=31, d_model=15, num_layers=2, num_heads=3, d_ff=22, max_len=13)
  return TextEncoder(**{**args, **kw}, rngs=nnx.Rngs(0))


def _all_params_named(module):
  state = nnx.state(module, nnx.Param)
  leaves = jax.tree.leaves(state)
  specs = jax.tree.leaves(nnx.get_partition_spec(state),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(specs)
  for value, spec in zip(leaves, specs):
    assert len(spec) == value.ndim and all(isinstance(n, str) for n in spec), spec
  return len(leaves)


@pytest.mark.parametrize('layout', [
    dict(norm_position='post'),
    dict(norm_position='pre', type_vocab_size=0, relative_buckets=8, relative_max_distance=16)])
def test_text_encoder_is_bidirectional_and_ignores_padding_keys(layout):
  enc = _text_encoder(**layout)
  assert _all_params_named(enc) > 10
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 31, (2, 11)), jnp.int32)
  valid = jnp.arange(11)[None] < jnp.array([[11], [7]])
  hidden, out = _encode(enc, tokens, valid)
  assert hidden.shape == (2, 11, 15) and len(out['hidden_states']) == 3
  assert bool(jnp.all(jnp.isfinite(hidden)))
  # Bidirectional: the first position sees the last token.
  changed = tokens.at[0, -1].set(5 if int(tokens[0, -1]) != 5 else 6)
  assert not np.allclose(_encode(enc, changed, valid)[0][0, 0], hidden[0, 0])
  # Padding keys are never attended: changing row 1's padded tokens leaves its valid outputs.
  padded = tokens.at[1, 7:].set(3)
  np.testing.assert_allclose(_encode(enc, padded, valid)[0][1, :7], hidden[1, :7], atol=1e-6)


def test_text_encoder_rejects_too_long_input():
  with pytest.raises(ValueError, match='max_len'):
    _text_encoder()(jnp.ones((1, 14), jnp.int32))


def test_relative_position_buckets():
  b = relative_position_buckets(40, 40, 16, 32)
  assert b.min() >= 0 and b.max() < 16
  assert b[5, 5] == 0 and b[5, 6] != b[6, 5]  # direction matters
  np.testing.assert_array_equal(b[10, 10:], b[20, 20:30].tolist() + b[10, 20:].tolist())
  assert b[0, 39] == b[0, 38]  # far distances share a bucket


def test_patchify_plus_linear_equals_strided_conv():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 6, 9, 2)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32)  # HWIO
  conv = jax.lax.conv_general_dilated(images, kernel, (3, 3), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = jnp.einsum('BPK,KD->BPD', patchify(images, 3), kernel.reshape(-1, 5))
  np.testing.assert_allclose(ours, conv.reshape(2, -1, 5), rtol=1e-5, atol=1e-5)


def test_vit_shapes_cls_and_position_interpolation():
  vit = VisionEncoder(image_size=8, patch_size=2, d_model=14, num_layers=1, num_heads=2,
                      d_ff=20, channels=1, rngs=nnx.Rngs(0))
  assert _all_params_named(vit) > 5
  images = jnp.asarray(np.random.default_rng(0).random((3, 8, 8, 1)), jnp.float32)
  assert _see(vit, images).shape == (3, 17, 14) and vit.num_tokens() == 17
  # A new resolution: the 4x4 position grid is resized to 6x6.
  big = jax.image.resize(images, (3, 12, 12, 1), 'nearest')
  assert _see(vit, big).shape == (3, 37, 14) and vit.num_tokens(12) == 37
  table = vit.positions[...]
  np.testing.assert_array_equal(interpolate_positions(table, (4, 4)), table)
  resized = interpolate_positions(table, (8, 8))
  np.testing.assert_allclose(resized.mean((0, 1)), table.mean((0, 1)), atol=1e-5)
  no_cls = VisionEncoder(image_size=8, patch_size=4, d_model=6, num_layers=1, num_heads=2,
                         d_ff=8, channels=1, use_cls=False, rngs=nnx.Rngs(0))
  assert _see(no_cls, images).shape == (3, 4, 6)
  with pytest.raises(ValueError, match='channels'):
    vit(jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize('kind, kw, outputs', [
    ('linear', {}, 7), ('mlp', dict(num_layers=3, d_hidden=9), 7),
    ('resampler', dict(num_layers=2, num_latents=5, num_heads=2), 5)])
def test_connector_shapes(kind, kw, outputs):
  conn = Connector(kind=kind, d_in=6, d_out=10, **kw, rngs=nnx.Rngs(0))
  _all_params_named(conn)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 7, 6)), jnp.float32)
  valid = jnp.arange(7)[None] < jnp.array([[7], [3], [7], [1]])
  y = _connect(conn, x, valid)
  assert y.shape == (4, outputs, 10) and conn.num_outputs(7) == outputs
  if kind == 'resampler':  # padding keys are ignored
    x2 = x.at[1, 3:].set(100.0)
    np.testing.assert_allclose(_connect(conn, x2, valid)[1], y[1], atol=1e-5)
  else:  # row-aligned: row j depends on input row j only
    x2 = x.at[:, 4].set(0.0)
    np.testing.assert_allclose(_connect(conn, x2, valid)[:, :4], y[:, :4], atol=1e-6)


def test_connector_rejects_unknown_kind():
  with pytest.raises(ValueError, match='kind'):
    Connector(kind='qformer', d_in=4, d_out=4, rngs=nnx.Rngs(0))
