"""The original's image preprocessing: TargetPad / SquarePad, bicubic resize, centre crop, CLIP normalisation."""
from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torchvision.transforms.functional as TF
from torchvision import transforms as T

# CLIP / BLIP normalisation constants (the original's `targetpad_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TargetPad:
    """Pad to aspect ratio `target_ratio` with black borders, only if the image is more elongated than that."""

    def __init__(self, target_ratio: float):
        if not target_ratio >= 1.0:
            raise ValueError(f"target_ratio must be >= 1, got {target_ratio}")
        self.target_ratio = target_ratio

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.target_ratio:
            return image
        scaled = max(w, h) / self.target_ratio
        # int() truncates toward zero exactly as the original; padding is symmetric, so odd gaps lose a pixel.
        hp = max(int((scaled - w) / 2), 0)
        vp = max(int((scaled - h) / 2), 0)
        return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"TargetPad(target_ratio={self.target_ratio})"


class SquarePad:
    """Pad to a square with black borders (the original's `SquarePad`)."""

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        w, h = image.size
        side = max(w, h)
        hp = int((side - w) / 2)
        vp = int((side - h) / 2)
        return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return "SquarePad()"


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.convert("RGB")


def _finish(pad: Callable[[PIL.Image.Image], PIL.Image.Image], image_size: int) -> T.Compose:
    if not (isinstance(image_size, int) and image_size > 0):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return T.Compose(
        [
            pad,
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            _to_rgb,
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def targetpad_transform(target_ratio: float = 1.25, image_size: int = 384) -> T.Compose:
    """The original preprocessing: TargetPad, bicubic resize of the short side, centre crop, RGB, CLIP normalise.

    Args:
        target_ratio: pad only images with max/min side >= this, up to this ratio.
        image_size: output side S; the result maps a PIL image to a float tensor (3, S, S).
    """
    return _finish(TargetPad(target_ratio), image_size)


def squarepad_transform(image_size: int = 384) -> T.Compose:
    """SquarePad then the same resize, crop and normalisation as `targetpad_transform`.

    Args:
        image_size: output side S; PIL image -> float tensor (3, S, S).
    """
    return _finish(SquarePad(), image_size)
