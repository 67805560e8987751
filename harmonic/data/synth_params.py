"""The synthetic generator's parameters and their ranges: light (no numpy), so a spec is validated
without importing the image stack; :mod:`harmonic.data.synth` generates the images.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORMAT_VERSION", "SynthParams"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SynthParams:
    """Generation parameters (written to ``synth.json``; see :func:`harmonic.data.synth.generate`)."""

    train: int = 200
    val: int = 50
    test: int = 0
    image_size: int = 256
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.07
    max_scale: float = 0.17
    occlusion: float = 0.5
    min_visible: float = 0.4
    tail_prob: float = 0.3
    clutter: int = 2
    aspect_ratios: tuple[float, ...] = (1.0,)
    compress_level: int = 1
    version: int = FORMAT_VERSION

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"synth: {msg}")

        need(
            self.train >= 0 and self.val >= 0 and self.test >= 0,
            f"train/val/test must be >= 0, got {self.train}/{self.val}/{self.test}",
        )
        need(32 <= self.image_size <= 4096, f"image_size must be in [32, 4096], got {self.image_size}")
        need(1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects")
        need(0 < self.min_scale <= self.max_scale <= 0.5, "need 0 < min_scale <= max_scale <= 0.5")
        need(0.0 <= self.occlusion <= 1.0, "occlusion must be in [0, 1]")
        need(0.0 < self.min_visible <= 1.0, "min_visible must be in (0, 1]")
        need(0.0 <= self.tail_prob <= 1.0, "tail_prob must be in [0, 1]")
        need(self.clutter >= 0, "clutter must be >= 0")
        need(
            len(self.aspect_ratios) > 0 and all(0.25 <= a <= 4 for a in self.aspect_ratios),
            "aspect ratios in [0.25, 4]",
        )
        need(0 <= self.compress_level <= 9, "compress_level must be in [0, 9]")
