"""Image preprocessing: the one place where stored pixels become a model's input.

Two steps, so that the expensive one runs once, where the data is read:

  resize_image(image, S)                      encoded bytes | uint8 [H, W(, C)]
                                              -> uint8 RGB [S, S, 3]
  preprocess_image(image, image_size=S,       uint8 image -> float32 [S, S, C]
                   channels=C, kind=K)

`kind` says how pixels become floats:

  'digits'  the native 8x8 gray `digits_vl` scans (`data/digits.py`): pixels / 255,
            upsampled by nearest neighbour (pixel repetition) to S, a multiple of the
            square image's side; the gray channel (channel 0) repeated to C in (1, 3).
            Nothing is invented between pixels, so the stored data stays the real data.
  'rgb'     real RGB images: bicubic resize to S x S (`resize_image`, skipped when the image
            already is uint8 [S, S, 3]), pixels / 255, in [0, 1]. C must be 3. What METALM's
            ViT, trained from scratch, reads.
  'clip'    as 'rgb', then CLIP's per-channel mean / std (`CLIP_MEAN`, `CLIP_STD`): what a
            CLIP ViT (mPLUG's) expects.

`resize_image` squeezes the whole image to a square (the aspect ratio is not kept, so
nothing is cropped away: a question may be about any corner of the image), as mPLUG's
evaluation transform does. JPEG bytes are decoded at the smallest DCT scale that still
covers S x S (PIL's `draft`), which is much faster for 224 px from COCO's ~640 x 480 and
changes the result only marginally.

This module must stay importable on its own: grain worker processes re-import it.
"""
import io

import numpy as np
from PIL import Image

KINDS = ("digits", "rgb", "clip")
# CLIP's image normalisation (OpenAI CLIP; mPLUG's ViT is CLIP's), per RGB channel.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _is_encoded(image) -> bool:
  return isinstance(image, (bytes, bytearray, memoryview))


def resize_image(image, image_size: int) -> np.ndarray:
  """An image -> uint8 RGB [S, S, 3]: bicubic, the whole image squeezed to a square.

  Args:
    image: encoded bytes (JPEG, PNG, ...) or uint8 pixels [H, W], [H, W, 1], [H, W, 3] or
      [H, W, 4] (gray is repeated to RGB, alpha dropped).
    image_size: S.

  Returns:
    uint8 [S, S, 3]; the input's pixels unchanged when it already is RGB S x S.

  Raises:
    ValueError: pixels that are not uint8, or an unsupported shape.
  """
  if image_size < 1:
    raise ValueError(f"image_size={image_size} must be >= 1.")
  if _is_encoded(image):
    pil = Image.open(io.BytesIO(bytes(image)))
    if pil.format == "JPEG":
      pil.draft("RGB", (image_size, image_size))
  else:
    array = np.asarray(image)
    if array.dtype != np.uint8:
      raise ValueError(f"resize_image needs uint8 pixels, got {array.dtype} (shape "
                       f"{array.shape}); convert with np.uint8 or pass encoded bytes.")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
      raise ValueError(f"image of shape {np.shape(image)}: expected [H, W] or "
                       "[H, W, 1 | 3 | 4] uint8 pixels.")
    pil = Image.fromarray(array)
  pil = pil.convert("RGB")
  if pil.size != (image_size, image_size):
    pil = pil.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(pil, np.uint8)


def _digits(image, image_size: int, channels: int) -> np.ndarray:
  """Nearest-neighbour upsampling of a small square gray image (see the module docstring)."""
  if _is_encoded(image):
    raise ValueError("kind='digits' takes decoded uint8 pixels [h, w(, c)], not encoded "
                     "bytes; read the dataset with its images decoded.")
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"kind='digits' needs an image [h, w] or [h, w, c], got shape "
                     f"{image.shape}.")
  height, width = image.shape[:2]
  if max(height, width) > image_size:
    raise ValueError(f"image of {height}x{width} pixels is larger than image_size={image_size} "
                     "(the config's maximum): raise the image size in the config, or resize the "
                     "images when preparing the dataset.")
  if height != width or image_size % height:
    raise ValueError(f"image_size={image_size} must be a multiple of the square image's "
                     f"side (image shape {image.shape}); e.g. 8, 16, 32 for digits.")
  factor = image_size // height
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  image = image.astype(np.float32) / 255.0
  return np.repeat(image[..., :1], channels, axis=-1)


def check_kind(kind: str, channels: int) -> None:
  """Raises ValueError unless `kind` is one of KINDS and can give `channels` channels."""
  if kind not in KINDS:
    raise ValueError(f"Unknown image preprocessing kind={kind!r}; kinds: {list(KINDS)}.")
  if kind == "digits" and channels not in (1, 3):
    raise ValueError(f"channels={channels} must be 1 (gray) or 3 (gray repeated) for "
                     "kind='digits'.")
  if kind != "digits" and channels != 3:
    raise ValueError(f"kind={kind!r} gives RGB images: channels={channels} must be 3 (set "
                     "the vision encoder's channels to 3, or use kind='digits' for gray "
                     "digits).")


def preprocess_image(image, *, image_size: int, channels: int, kind: str) -> np.ndarray:
  """One image -> the model's input, float32 [S, S, C] (S = image_size, C = channels).

  Args:
    image: uint8 pixels [H, W(, C)] (or, for 'rgb' / 'clip', encoded bytes).
    image_size: S.
    channels: C: 1 or 3 for 'digits', 3 for 'rgb' and 'clip'.
    kind: 'digits' | 'rgb' | 'clip' (module docstring).

  Raises:
    ValueError: an unknown kind, a channel count the kind cannot give, or an image the kind
      cannot take (e.g. a digits image larger than image_size).
  """
  check_kind(kind, channels)
  if kind == "digits":
    return _digits(image, image_size, channels)
  array = None if _is_encoded(image) else np.asarray(image)
  if array is None or array.shape != (image_size, image_size, 3) or array.dtype != np.uint8:
    array = resize_image(image, image_size)
  pixels = array.astype(np.float32) / 255.0
  if kind == "clip":
    pixels = (pixels - CLIP_MEAN) / CLIP_STD
  return pixels
