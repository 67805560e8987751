"""Ray's private names that this package uses are all still where workers/ray_compat.py looks.

A Ray upgrade that moves one fails here, naming the Ray private path, instead of deep inside a
training run (or, for an overridden ``TorchTrainer`` method, silently: the override would no
longer be called).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers import ray_compat


def test_every_private_use_goes_through_ray_compat() -> None:
    """The modules that once imported Ray's private modules do it only through ray_compat now."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for rel in (
        "workers/training/trainer.py",
        "workers/training/worker_loop.py",
        "workers/training/controller_hooks.py",
    ):
        text = (root / rel).read_text()
        for private in ("._internal", "ray._private", "ray._common", "ray._raylet"):
            assert private not in text, f"{rel} uses {private} directly: go through workers/ray_compat.py"


@pytest.mark.parametrize("accessor", sorted(ray_compat.PRIVATE))
def test_ray_private_name_is_where_ray_compat_looks(accessor: str) -> None:
    path = ray_compat.PRIVATE[accessor]
    try:
        value = getattr(ray_compat, accessor)()
    except ImportError as e:
        import ray

        pytest.fail(
            f"Ray {ray.__version__} moved {path.replace(':', '.')} (workers.ray_compat.{accessor}): {e}",
            pytrace=False,
        )
    assert value is not None, f"{path} is None"


def test_torch_trainer_still_has_the_members_harmonic_trainer_overrides() -> None:
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    missing = [name for name in ray_compat.TORCH_TRAINER_INTERNALS if not hasattr(trainer, name)]
    assert not missing, (
        f"Ray {ray.__version__}: TorchTrainer has no {', '.join(missing)} "
        "(workers.training.trainer.HarmonicTrainer overrides or uses them; see workers/ray_compat.py)"
    )


def test_a_moved_name_is_reported_by_its_path() -> None:
    with pytest.raises(ray_compat.RayPrivateMoved, match=r"ray\.train\.v2\._internal\.util\.NoSuchThing"):
        ray_compat.load("ray.train.v2._internal.util:NoSuchThing")
    with pytest.raises(ray_compat.RayPrivateMoved, match=r"ray\.train\.v2\._internal\.no_such_module"):
        ray_compat.load("ray.train.v2._internal.no_such_module:X")


def test_importing_ray_compat_imports_no_ray() -> None:
    code = "import sys, workers.ray_compat\nprint(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
