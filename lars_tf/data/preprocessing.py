"""Image preprocessing: decode, crop, flip per image; normalise and cast per batch (tf.data).

Modes, each with a training and an evaluation form:

- `paper`: resize to `resize_size` x `resize_size`, ignoring the aspect ratio as the
  paper's Caffe LMDBs did, then a random `image_size` crop and a random flip; evaluation:
  the same resize and the central crop. An image stored at that size (the converter's
  `resize`) is not resized, and of a JPEG only the crop window is decoded.
- `inception`: random-resized crop (area 8-100 %, aspect 3/4-4/3; only the crop window of
  a JPEG is decoded), resize to `image_size`, random flip; evaluation: the central square
  of `image_size / resize_size` of the shorter side, resized to `image_size`.
- `eval`: the evaluation form of `inception`, also when training.
- `cifar`: resize to `image_size` if needed, pad 4 pixels, random crop, random flip;
  evaluation: the resize only.
- `none`: resize to `image_size` if needed, no normalisation (values 0..255).

Randomness uses stateless ops with a per-image seed, so a seeded pipeline gives the same
augmentation whatever its parallelism. All modes but `none` then subtract the per-channel
`mean` and divide by `std` (when given), and cast to the model's compute dtype.

Speed (`docs/benchmarks.md`, part 3): the per-image work (`ImagePreprocessor.prepare`) stays in
uint8 (resampled pixels are rounded, as Caffe's and PIL-based pipelines do) and the float work
(`normalize`) runs once per batch, vectorised over it: float32 images are 4x the bytes to crop,
flip and batch. (A crop and flip fused into one strided slice was tried: with a dynamic stride
TensorFlow copies element by element, 3x slower than a slice and a reverse.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

# Per-channel RGB statistics on the 0..255 scale.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
IMAGENET_STD_RGB = (58.393, 57.12, 57.375)
CIFAR10_MEAN_RGB = (125.31, 122.95, 113.87)
CIFAR10_STD_RGB = (62.99, 62.09, 66.70)

MODES = ("paper", "inception", "eval", "cifar", "none")
# Standard evaluation crop: 224 of 256.
CROP_FRACTION = 0.875
CIFAR_PADDING = 4
# Random-resized crop constants of Inception / torchvision / TF Model Garden.
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MIN_OBJECT_COVERED = 0.1
MAX_ATTEMPTS = 10
# Columns decoded beyond each side of a JPEG crop window (see `decode_and_crop`): one chroma
# sample of 2:1 horizontal subsampling, 2 pixels; 1 sufficed in the tests.
CROP_MARGIN = 2


def default_resize_size(image_size: int) -> int:
    """256 for the paper's 224 and 227 crops, else `image_size / 0.875` (e.g. 32 -> 37)."""
    return 256 if 224 <= image_size <= 256 else round(image_size / CROP_FRACTION)


def compute_dtype(dtype: Any) -> tf.DType:
    """The float dtype images are delivered in, from a dtype or a mixed-precision policy.

    Accepts `"float32"`, `"bfloat16"`, `tf.float16`, policy names like `"mixed_float16"`
    or any object with a `compute_dtype` attribute (a `keras.DTypePolicy`).
    """
    name = getattr(dtype, "compute_dtype", dtype)
    if isinstance(name, str) and name.startswith("mixed_"):
        name = name[len("mixed_") :]
    try:
        result = tf.as_dtype(name)
    except TypeError:
        result = None
    if result is None or not result.is_floating:
        raise ValueError(f"dtype must be a float dtype or mixed-precision policy, got {dtype!r}")
    return result


def _shape_of(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """Image height and width without decoding the pixels when the bytes are a JPEG."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.image.extract_jpeg_shape(encoded)[:2],
        lambda: tf.shape(decode(encoded, channels))[:2],
    )


def decode(encoded: tf.Tensor, channels: int = 3) -> tf.Tensor:
    """Decodes JPEG, PNG, GIF or BMP bytes to uint8 `[height, width, channels]`."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def decode_and_crop(
    encoded: tf.Tensor, window: tf.Tensor, channels: int, width: tf.Tensor | None = None
) -> tf.Tensor:
    """Decodes only `window` (`[y, x, height, width]`) of a JPEG; other formats fully.

    The same pixels as decoding the whole JPEG and cropping: `tf.image.decode_and_crop_jpeg`
    alone is not, for chroma-subsampled JPEGs (most of ImageNet), whose chroma it upsamples
    treating the window's left and right edges as the image's (an edge column off by up to
    ~25 levels in about half the windows). So the window is widened by `CROP_MARGIN` columns
    each side within the image (`width`, read from the header when not given), decoded, and
    cut back."""

    def jpeg():
        full_width = tf.image.extract_jpeg_shape(encoded)[1] if width is None else width
        left = tf.maximum(window[1] - CROP_MARGIN, 0)
        right = tf.minimum(window[1] + window[3] + CROP_MARGIN, full_width)
        wide = tf.stack([window[0], left, window[2], right - left])
        image = tf.image.decode_and_crop_jpeg(encoded, wide, channels=channels)
        return image[:, window[1] - left : window[1] - left + window[3]]

    def other():
        image = decode(encoded, channels)
        return tf.slice(
            image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], -1])
        )

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, channels])
    return image


def random_crop_window(shape: tf.Tensor, bboxes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Samples an Inception-style crop window `[y, x, height, width]` of an image `shape`."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [1]], axis=0),
        bounding_boxes=bboxes,
        seed=seed,
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(shape: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """The central square of `image_size / resize_size` of the shorter side, as a window."""
    height, width = shape[0], shape[1]
    side = tf.cast(
        tf.cast(image_size / resize_size, tf.float32)
        * tf.cast(tf.minimum(height, width), tf.float32),
        tf.int32,
    )
    side = tf.maximum(side, 1)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    return tf.image.resize(image, [size, size], method="bilinear")


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    # Rounds a resampled float image (values within 0..255: bilinear of uint8) to uint8.
    return tf.cast(image + 0.5, tf.uint8)


def _resize_unless_sized(image: tf.Tensor, size: int) -> tf.Tensor:
    """`image` (uint8) resized to `size x size` and rounded to uint8, or as it is when it has
    that size already (the converter's `resize`, the paper's 256 x 256 LMDBs): bilinear with
    half-pixel centres maps a size onto itself exactly, so only the time changes (the resize
    costs about what the decode costs)."""
    shape = tf.shape(image)
    sized = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    return tf.cond(sized, lambda: image, lambda: _to_uint8(_resize(image, size)))


def paper_crop_window(resize_size: int, size: int, seed: tf.Tensor | None) -> tf.Tensor:
    """The paper mode's `size` crop of the `resize_size` square, as `[y, x, size, size]`:
    random (the offset `tf.image.stateless_random_crop(image, [size, size, c], seed)` takes,
    so that the crop is the one it would cut) or, without a seed, central."""
    if seed is None:
        offset = tf.fill([2], (resize_size - size) // 2)
    else:
        limit = tf.constant([resize_size - size + 1, resize_size - size + 1, 1], tf.int32)
        offset = (
            tf.random.stateless_uniform([3], seed, maxval=tf.int32.max, dtype=tf.int32) % limit
        )[:2]
    return tf.concat([offset, [size, size]], axis=0)


def _paper_crop(encoded: tf.Tensor, window: tf.Tensor, resize_size: int, channels: int):
    """`window` of the image resized to `resize_size` x `resize_size`. An image stored at
    that size (the converter's `resize`, the paper's 256 x 256 LMDBs) needs no resize, and
    a JPEG of it is decoded in that window only (`decode_and_crop`): the same pixels as
    decoding it whole and cropping, at about 0.8 of the decoding work for 227 of 256."""
    shape = _shape_of(encoded, channels)
    sized = tf.logical_and(tf.equal(shape[0], resize_size), tf.equal(shape[1], resize_size))

    def resized():
        image = _to_uint8(_resize(decode(encoded, channels), resize_size))
        return tf.slice(
            image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], -1])
        )

    image = tf.cond(sized, lambda: decode_and_crop(encoded, window, channels, shape[1]), resized)
    image.set_shape([None, None, channels])
    return image


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """Turns encoded image bytes into a model input; one instance per pipeline.

    Attributes:
        mode: one of `MODES` (see the module docstring).
        is_training: training (random) or evaluation (deterministic) form of the mode.
        image_size: side of the square output.
        resize_size: side the image is resized to before cropping (`paper`) or the crop
            fraction's denominator (`inception`/`eval`); default `default_resize_size()`.
        channels: 3 (RGB; grayscale is replicated) or 1 (RGB is converted to gray).
        mean: per-channel mean subtracted (length 1 or `channels`), None for none.
        std: per-channel divisor (length 1 or `channels`), None for none.
        dtype: output dtype or mixed-precision policy (its compute dtype is used).
    """

    mode: str
    is_training: bool
    image_size: int
    resize_size: int | None = None
    channels: int = 3
    mean: Sequence[float] | None = IMAGENET_MEAN_RGB
    std: Sequence[float] | None = None
    dtype: Any = "float32"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"preprocessing must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.image_size, int) and self.image_size > 0):
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", default_resize_size(self.image_size))
        if self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size={self.resize_size} must be >= image_size={self.image_size}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) not in (1, self.channels):
                    raise ValueError(
                        f"{name} has {len(value)} values; expected 1 or channels={self.channels}"
                    )
                if name == "std" and min(value) <= 0:
                    raise ValueError(f"std must be positive, got {value}")
                object.__setattr__(self, name, value)
        object.__setattr__(self, "dtype", compute_dtype(self.dtype))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def __call__(
        self, encoded: tf.Tensor, bboxes: tf.Tensor | None = None, seed: tf.Tensor | None = None
    ) -> tf.Tensor:
        """Preprocesses one image: `normalize(prepare(encoded, bboxes, seed))`.

        Returns:
            `[image_size, image_size, channels]` tensor of `dtype`.
        """
        return self.normalize(self.prepare(encoded, bboxes, seed))

    def prepare(
        self, encoded: tf.Tensor, bboxes: tf.Tensor | None = None, seed: tf.Tensor | None = None
    ) -> tf.Tensor:
        """The per-image part: decode, resize, crop, flip; normalise batches of it.

        Args:
            encoded: scalar string tensor of image bytes.
            bboxes: float32 `[1, N, 4]` object boxes guiding the `inception` crop, or None.
            seed: int64 `[2]` stateless seed of this image; required when training with a
                random mode.

        Returns:
            `[image_size, image_size, channels]` uint8 tensor.
        """
        training = self.is_training and self.mode in ("paper", "inception", "cifar")
        if training and seed is None:
            raise ValueError(f"preprocessing={self.mode!r} for training needs a seed")
        crop_seed, flip_seed = (
            tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            if training
            else (None, None)
        )
        size, channels = self.image_size, self.channels
        if self.mode == "paper":
            window = paper_crop_window(self.resize_size, size, crop_seed if training else None)
            image = _paper_crop(encoded, window, self.resize_size, channels)
            if training:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        elif self.mode == "inception" and training:
            if bboxes is None:
                bboxes = tf.zeros([1, 0, 4], tf.float32)
            shape = _shape_of(encoded, channels)
            window = random_crop_window(shape, bboxes, crop_seed)
            # Flipping the (uint8) crop before the resize equals flipping after it, up to
            # float rounding: the half-pixel bilinear grid is mirror-symmetric.
            crop = decode_and_crop(encoded, window, channels, shape[1])
            crop = tf.image.stateless_random_flip_left_right(crop, flip_seed)
            image = _to_uint8(_resize(crop, size))
        elif self.mode in ("inception", "eval"):
            shape = _shape_of(encoded, channels)
            window = center_crop_window(shape, size, self.resize_size)
            crop = decode_and_crop(encoded, window, channels, shape[1])
            image = _to_uint8(_resize(crop, size))
        else:  # cifar, none
            image = _resize_unless_sized(decode(encoded, channels), size)
            if training:
                padding = [[CIFAR_PADDING, CIFAR_PADDING], [CIFAR_PADDING, CIFAR_PADDING], [0, 0]]
                image = tf.image.stateless_random_crop(
                    tf.pad(image, padding), self.output_shape, crop_seed
                )
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        image.set_shape(self.output_shape)
        return image

    def normalize(self, image: tf.Tensor) -> tf.Tensor:
        """Subtracts `mean`, divides by `std` (unless mode `none`), casts to `dtype`; for one
        image or a batch (channels last)."""
        image = tf.cast(image, tf.float32)
        if self.mode != "none":
            if self.mean is not None:
                image -= tf.constant(self.mean, tf.float32)
            if self.std is not None:
                image /= tf.constant(self.std, tf.float32)
        return tf.cast(image, self.dtype)
