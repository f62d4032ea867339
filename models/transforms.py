"""THE preprocessing of MedChain: small composable transforms with a serializable config.

Training, evaluation and edge inference all run the same chain, rebuilt from the config the
model card stores (``Compose.from_config(card.preprocessing)``), so the edge cannot drift
from what the model was trained on. numpy and OpenCV only: edge devices import this module
without torch.

Layout: a chain takes one raw image, ``(H, W)`` or ``(H, W, C)`` of any numeric dtype, and
its last step (:class:`ToChannelsFirst`) returns float32 ``(C, H, W)``. Random transforms
(augmentations, training only) act on that output and draw from the ``rng`` they are given,
so a seeded generator reproduces them exactly.

Adding a transform: a frozen dataclass subclassing :class:`Transform`, decorated with
:func:`register`, whose fields are JSON values (numbers, strings, tuples of them); validate
them in ``__post_init__`` and raise :class:`TransformError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import cv2
import numpy as np

from models.errors import TransformError

__all__ = [
    "Transform",
    "register",
    "TRANSFORMS",
    "Compose",
    "EnsureChannels",
    "ScaleIntensity",
    "PercentileScale",
    "Resize",
    "Normalize",
    "ToChannelsFirst",
    "RandomAffine",
    "RandomFlip",
    "RandomIntensity",
    "from_config",
    "apply_batch",
    "channel_stats",
]

TRANSFORMS: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    """Make a transform constructible from its config by name."""
    if cls.name in TRANSFORMS and TRANSFORMS[cls.name] is not cls:
        raise TransformError(f"transform name {cls.name!r} registered twice")
    TRANSFORMS[cls.name] = cls
    return cls


class Transform:
    """One preprocessing step: ``image -> image``; random ones use the ``rng`` passed in."""

    name: ClassVar[str] = ""
    is_random: ClassVar[bool] = False

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        params = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"name": self.name, **params}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def _hwc(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3:
        return image
    raise TransformError(f"expected an image of shape (H, W) or (H, W, C), got {image.shape}")


def _need_random(t: Transform, rng: np.random.Generator | None) -> np.random.Generator:
    if rng is None:
        raise TransformError(f"{t.name} is random and needs an rng (a seeded numpy Generator)")
    return rng


@register
@dataclasses.dataclass(frozen=True)
class EnsureChannels(Transform):
    """``(H, W)`` or ``(H, W, C)`` -> ``(H, W, channels)``: grey is repeated into RGB, RGB is
    reduced to luma (ITU-R BT.601) for a grey model, an alpha channel is dropped."""

    channels: int
    name: ClassVar[str] = "EnsureChannels"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise TransformError(f"EnsureChannels: channels must be 1 or 3, got {self.channels}")

    def __call__(self, image, rng=None):
        img = _hwc(np.asarray(image))
        c = img.shape[2]
        if c == 4:
            img, c = img[:, :, :3], 3
        if c == self.channels:
            return img
        if c == 1:
            return np.repeat(img, self.channels, axis=2)
        if c == 3:
            luma = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            return luma[:, :, None]
        raise TransformError(f"EnsureChannels: cannot map {c} channels to {self.channels}")


@register
@dataclasses.dataclass(frozen=True)
class ScaleIntensity(Transform):
    """Linear map of the fixed range ``[low, high]`` to ``[0, 1]`` (e.g. 0..255 for uint8),
    clipped: the same scale for every image."""

    low: float = 0.0
    high: float = 255.0
    name: ClassVar[str] = "ScaleIntensity"

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise TransformError(f"ScaleIntensity: high ({self.high}) must exceed low ({self.low})")

    def __call__(self, image, rng=None):
        out = (np.asarray(image, np.float32) - np.float32(self.low)) / np.float32(self.high - self.low)
        return np.clip(out, 0.0, 1.0, out=out)


@register
@dataclasses.dataclass(frozen=True)
class PercentileScale(Transform):
    """Per-image map of the ``lower``..``upper`` percentiles to ``[0, 1]``, clipped: for
    sources whose stored ranges differ from image to image (DICOM of several scanners)."""

    lower: float = 0.5
    upper: float = 99.5
    name: ClassVar[str] = "PercentileScale"

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower < self.upper <= 100.0:
            raise TransformError("PercentileScale: need 0 <= lower < upper <= 100")

    def __call__(self, image, rng=None):
        img = np.asarray(image, np.float32)
        lo, hi = np.percentile(img, [self.lower, self.upper])
        if hi <= lo:  # a constant image carries no contrast: map it to zero
            return np.zeros_like(img)
        return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


@register
@dataclasses.dataclass(frozen=True)
class Resize(Transform):
    """Resize to ``(height, width)`` with the named interpolation (``area`` suits shrinking;
    the design asks bilinear for CT/MR/US and bicubic for X-ray when enlarging)."""

    height: int
    width: int
    interpolation: str = "bilinear"
    name: ClassVar[str] = "Resize"

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise TransformError(f"Resize: size must be positive, got {self.height}x{self.width}")
        if self.interpolation not in _INTERPOLATION:
            raise TransformError(f"Resize: interpolation must be one of {sorted(_INTERPOLATION)}")

    def __call__(self, image, rng=None):
        img = _hwc(np.asarray(image))
        if img.shape[:2] == (self.height, self.width):
            return img
        if img.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
            img = img.astype(np.float32)
        out = cv2.resize(img, (self.width, self.height), interpolation=_INTERPOLATION[self.interpolation])
        return out.reshape(self.height, self.width, img.shape[2])


@register
@dataclasses.dataclass(frozen=True)
class Normalize(Transform):
    """``(x - mean) / std`` per channel, with statistics fitted on the training split."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: ClassVar[str] = "Normalize"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise TransformError("Normalize: mean and std need one value per channel")
        if any(not s > 0 for s in self.std):
            raise TransformError("Normalize: every std must be positive")

    def __call__(self, image, rng=None):
        img = _hwc(np.asarray(image, np.float32))
        if img.shape[2] != len(self.mean):
            raise TransformError(f"Normalize: image has {img.shape[2]} channels, stats have {len(self.mean)}")
        return (img - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


@register
@dataclasses.dataclass(frozen=True)
class ToChannelsFirst(Transform):
    """``(H, W, C)`` -> contiguous float32 ``(C, H, W)``, the model's input layout."""

    name: ClassVar[str] = "ToChannelsFirst"

    def __call__(self, image, rng=None):
        return np.ascontiguousarray(_hwc(np.asarray(image, np.float32)).transpose(2, 0, 1))


def _chw_warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    c, h, w = image.shape
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    out = cv2.warpAffine(hwc, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(out.reshape(h, w, c).transpose(2, 0, 1))


@register
@dataclasses.dataclass(frozen=True)
class RandomAffine(Transform):
    """Augmentation on ``(C, H, W)``: rotation up to ``degrees``, isotropic scale within
    ``1 +- scale``, shift up to ``translate`` of the size, applied with probability ``p``."""

    degrees: float = 10.0
    scale: float = 0.1
    translate: float = 0.08
    p: float = 1.0
    name: ClassVar[str] = "RandomAffine"
    is_random: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.degrees < 0 or not 0 <= self.scale < 1 or not 0 <= self.translate < 1 or not 0 <= self.p <= 1:
            raise TransformError("RandomAffine: need degrees >= 0, 0 <= scale < 1, 0 <= translate < 1, 0 <= p <= 1")

    def __call__(self, image, rng=None):
        rng = _need_random(self, rng)
        angle, zoom = rng.uniform(-self.degrees, self.degrees), rng.uniform(1 - self.scale, 1 + self.scale)
        shift = rng.uniform(-self.translate, self.translate, 2)
        if rng.random() >= self.p:
            return image
        _, h, w = image.shape
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, zoom)
        matrix[:, 2] += (shift[0] * w, shift[1] * h)
        return _chw_warp(np.asarray(image, np.float32), matrix)


@register
@dataclasses.dataclass(frozen=True)
class RandomFlip(Transform):
    """Augmentation on ``(C, H, W)``: mirror along ``axis`` (1 vertical, 2 horizontal) with
    probability ``p``."""

    axis: int = 2
    p: float = 0.5
    name: ClassVar[str] = "RandomFlip"
    is_random: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.axis not in (1, 2) or not 0 <= self.p <= 1:
            raise TransformError("RandomFlip: axis must be 1 or 2 and 0 <= p <= 1")

    def __call__(self, image, rng=None):
        if _need_random(self, rng).random() < self.p:
            return np.ascontiguousarray(np.flip(image, axis=self.axis))
        return image


@register
@dataclasses.dataclass(frozen=True)
class RandomIntensity(Transform):
    """Augmentation on ``(C, H, W)``, with probability ``p``: another detector's look. A
    gamma curve ``u ** exp(U(-gamma, gamma))`` on the image's own min..max, then contrast
    ``1 +- contrast`` about its mean and a brightness offset of ``+- brightness`` of its
    std; works on normalised values, so it needs no knowledge of the raw range."""

    contrast: float = 0.2
    brightness: float = 0.1
    gamma: float = 0.3
    p: float = 0.8
    name: ClassVar[str] = "RandomIntensity"
    is_random: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.contrast < 1 or self.brightness < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.p <= 1:
            raise TransformError("RandomIntensity: need 0 <= contrast < 1, brightness >= 0, "
                                 "0 <= gamma <= 1, 0 <= p <= 1")

    def __call__(self, image, rng=None):
        rng = _need_random(self, rng)
        g, c, b = (np.exp(rng.uniform(-self.gamma, self.gamma)), rng.uniform(1 - self.contrast, 1 + self.contrast),
                   rng.uniform(-self.brightness, self.brightness))
        if rng.random() >= self.p:
            return image
        img = np.asarray(image, np.float32)
        lo, hi = float(img.min()), float(img.max())
        if hi > lo:
            img = np.power((img - lo) / (hi - lo), np.float32(g)) * (hi - lo) + lo
        mean, std = float(img.mean()), float(img.std())
        return (mean + np.float32(c) * (img - mean) + np.float32(b * std)).astype(np.float32)


@dataclasses.dataclass(frozen=True, init=False)
class Compose(Transform):
    """Transforms applied in order; its config is ``{"name": "Compose", "transforms": [...]}``."""

    transforms: tuple[Transform, ...]
    name: ClassVar[str] = "Compose"

    def __init__(self, transforms: Iterable[Transform]) -> None:
        steps = tuple(transforms)
        for t in steps:
            if not isinstance(t, Transform):
                raise TransformError(f"Compose: {t!r} is not a Transform")
        object.__setattr__(self, "transforms", steps)

    @property
    def is_random(self) -> bool:  # type: ignore[override]
        return any(t.is_random for t in self.transforms)

    def __call__(self, image, rng=None):
        for t in self.transforms:
            image = t(image, rng)
        return image

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "transforms": [t.to_config() for t in self.transforms]}

    @classmethod
    def from_config(cls, config: Any) -> Compose:
        built = from_config(config)
        return built if isinstance(built, Compose) else cls([built])


TRANSFORMS[Compose.name] = Compose


def from_config(config: Any) -> Transform:
    """Rebuild a transform (or a chain) from :meth:`Transform.to_config` output."""
    if isinstance(config, list):
        return Compose(from_config(c) for c in config)
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise TransformError("a transform config is a dict with a 'name' (or a list of them)")
    params = {k: v for k, v in config.items() if k != "name"}
    if config["name"] == Compose.name:
        steps = params.get("transforms")
        if not isinstance(steps, list) or set(params) != {"transforms"}:
            raise TransformError("Compose config needs exactly a 'transforms' list")
        return Compose(from_config(c) for c in steps)
    cls = TRANSFORMS.get(config["name"])
    if cls is None:
        raise TransformError(f"unknown transform {config['name']!r}")
    try:
        return cls(**{k: _tupled(v) for k, v in params.items()})
    except TypeError as exc:
        raise TransformError(f"{config['name']}: bad parameters ({exc})") from None


def apply_batch(chain: Transform, images: Sequence[np.ndarray] | np.ndarray,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Run ``chain`` on each image and stack the results (``(N, C, H, W)`` float32)."""
    if len(images) == 0:
        raise TransformError("apply_batch: no images")
    out = [np.asarray(chain(img, rng), np.float32) for img in images]
    shapes = {o.shape for o in out}
    if len(shapes) != 1:
        raise TransformError(f"the chain gives images of different shapes {sorted(shapes)}; add a Resize")
    return np.stack(out)


def channel_stats(batch: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``(N, C, H, W)`` (std floored so Normalize stays finite)."""
    mean = batch.mean(axis=(0, 2, 3), dtype=np.float64)
    std = batch.std(axis=(0, 2, 3), dtype=np.float64)
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-6)) for s in std)
