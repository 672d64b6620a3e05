"""data/images.py: the one image preprocessing module (digits, RGB, CLIP) and its resize."""
import io

import numpy as np
from PIL import Image
import pytest

from metalm_jax.data import images

RED, BLUE = (220, 30, 30), (30, 40, 220)


def old_digits_preprocess(image, *, image_size=8, num_channels=1):
  """A copy of `vl_pipeline.preprocess_image` before images.py existed (the reference)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  factor = image_size // image.shape[0]
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  image = image.astype(np.float32) / 255.0
  return np.repeat(image[..., :1], num_channels, axis=-1)


def halves(size=32) -> np.ndarray:
  """uint8 [size, size, 3]: the left half red, the right half blue."""
  x = np.arange(size)[None, :, None]
  return np.where(x < size // 2, RED, BLUE).astype(np.uint8) * np.ones((size, 1, 1), np.uint8)


def jpeg(array: np.ndarray, quality=95) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="JPEG", quality=quality)
  return out.getvalue()


@pytest.mark.parametrize("shape", [(8, 8, 1), (8, 8), (8, 8, 3)])
@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (24, 1), (32, 3)])
def test_digits_kind_is_bit_identical_to_the_old_pipeline(shape, size, channels):
  image = np.random.default_rng(size).integers(0, 256, shape).astype(np.uint8)
  got = images.preprocess_image(image, image_size=size, channels=channels, kind="digits")
  want = old_digits_preprocess(image, image_size=size, num_channels=channels)
  assert got.dtype == np.float32 and got.shape == (size, size, channels)
  np.testing.assert_array_equal(got, want)
  # nearest neighbour: every output pixel is a stored pixel / 255
  factor = size // 8
  np.testing.assert_array_equal(got[::factor, ::factor, 0],
                                np.asarray(image).reshape(8, 8, -1)[..., 0] / np.float32(255))


def test_digits_kind_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"16x16 pixels is larger than image_size=8"):
    images.preprocess_image(np.zeros((16, 16, 1), np.uint8), image_size=8, channels=1,
                            kind="digits")
  with pytest.raises(ValueError, match="multiple of the square image's side"):
    images.preprocess_image(np.zeros((8, 8, 1), np.uint8), image_size=12, channels=1,
                            kind="digits")
  with pytest.raises(ValueError, match="multiple of the square image's side"):
    images.preprocess_image(np.zeros((8, 6, 1), np.uint8), image_size=16, channels=1,
                            kind="digits")
  with pytest.raises(ValueError, match="channels=2 must be 1"):
    images.preprocess_image(np.zeros((8, 8, 1), np.uint8), image_size=8, channels=2,
                            kind="digits")
  with pytest.raises(ValueError, match="not encoded bytes"):
    images.preprocess_image(jpeg(halves(8)), image_size=8, channels=3, kind="digits")
  with pytest.raises(ValueError, match=r"\[h, w\] or \[h, w, c\]"):
    images.preprocess_image(np.zeros((1, 8, 8, 1), np.uint8), image_size=8, channels=1,
                            kind="digits")


def test_rgb_kind_resizes_bicubic_to_the_unit_range():
  image = halves(32)
  out = images.preprocess_image(image, image_size=16, channels=3, kind="rgb")
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_allclose(out[:, :6].reshape(-1, 3).mean(0), np.array(RED) / 255, atol=0.02)
  np.testing.assert_allclose(out[:, 10:].reshape(-1, 3).mean(0), np.array(BLUE) / 255,
                             atol=0.02)
  # an image already uint8 [S, S, 3] is only scaled; encoded bytes decode first
  small = images.resize_image(image, 16)
  np.testing.assert_array_equal(out, small.astype(np.float32) / 255)
  np.testing.assert_allclose(images.preprocess_image(jpeg(image), image_size=16, channels=3,
                                                     kind="rgb"), out, atol=0.06)


def test_clip_kind_is_rgb_with_clip_mean_and_std():
  image = halves(32)
  rgb = images.preprocess_image(image, image_size=8, channels=3, kind="rgb")
  clip = images.preprocess_image(image, image_size=8, channels=3, kind="clip")
  assert clip.dtype == np.float32 and clip.shape == (8, 8, 3)
  np.testing.assert_allclose(clip, (rgb - images.CLIP_MEAN) / images.CLIP_STD, rtol=1e-6)
  back = clip[4, 6] * images.CLIP_STD + images.CLIP_MEAN  # the right half: blue
  np.testing.assert_allclose(back, np.array(BLUE) / 255, atol=0.03)
  assert clip.min() < 0  # normalised, not in [0, 1]


def test_resize_image_takes_every_layout_and_squeezes_the_whole_image():
  gray = images.resize_image(np.full((20, 30), 77, np.uint8), 8)  # any shape, gray -> RGB
  assert gray.shape == (8, 8, 3) and gray.dtype == np.uint8 and (gray == 77).all()
  np.testing.assert_array_equal(images.resize_image(np.full((20, 30, 1), 77, np.uint8), 8),
                                gray)
  image = halves(32)
  rgba = np.concatenate([image, np.full((32, 32, 1), 255, np.uint8)], -1)
  np.testing.assert_array_equal(images.resize_image(rgba, 16), images.resize_image(image, 16))
  np.testing.assert_array_equal(images.resize_image(image, 32), image)  # already S x S
  # a wide image is squeezed, not cropped: both halves survive in a square
  wide = np.concatenate([halves(32), halves(32)], axis=1)  # 32 x 64: red blue red blue
  out = images.resize_image(wide, 16)
  assert out.shape == (16, 16, 3)
  assert out[8, 1, 0] > 150 and out[8, 14, 2] > 150  # red on the left, blue on the right


def test_jpeg_draft_decoding_is_close_to_decoding_in_full():
  rng = np.random.default_rng(0)
  big = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((20, 20, 1))).astype(np.uint8)
  data = jpeg(big)  # 240 x 320, decoded at a reduced DCT scale for 32 px
  with Image.open(io.BytesIO(data)) as full:
    reference = images.resize_image(np.asarray(full.convert("RGB")), 32)
  fast = images.resize_image(data, 32)
  assert fast.shape == (32, 32, 3)
  assert np.abs(fast.astype(float) - reference.astype(float)).mean() < 4


def test_clear_errors_for_bad_inputs_and_kinds():
  with pytest.raises(ValueError, match="uint8"):
    images.resize_image(halves(8).astype(np.float32), 8)
  with pytest.raises(ValueError, match=r"\[H, W, 1 \| 3 \| 4\]"):
    images.resize_image(np.zeros((8, 8, 2), np.uint8), 8)
  with pytest.raises(ValueError, match="image_size=0"):
    images.resize_image(halves(8), 0)
  with pytest.raises(ValueError, match="Unknown image preprocessing kind='vit'"):
    images.preprocess_image(halves(8), image_size=8, channels=3, kind="vit")
  for kind in ("rgb", "clip"):
    with pytest.raises(ValueError, match="channels=1 must be 3"):
      images.preprocess_image(halves(8), image_size=8, channels=1, kind=kind)
  images.check_kind("digits", 3)  # fine
  with pytest.raises(ValueError, match="kinds"):
    images.check_kind("", 3)
