"""A worker trains on the device Ray gave it, in the precision ``train.amp`` asks for, and refuses to
start when ``scaling.use_gpu`` and its device disagree: the pure decision, the precision table, one
bf16 training step on CPU, and (on a Ray with a fake GPU) the refusal end to end."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hdet_run import start_test_ray

from workers.spec import Spec, SpecError
from workers.training import recipe
from workers.training.controller_hooks import is_deterministic_error
from workers.training.errors import DeviceMismatchError

BASE: dict[str, Any] = {"name": "t", "dataset": {"format": "synthetic"}}


def _spec(**train: Any) -> Spec:
    return Spec.parse({**BASE, "train": train})


# --------------------------------------------------------------------------- device decision


@pytest.mark.parametrize(
    ("use_gpu", "gpu_ids", "cuda", "device"),
    [
        (True, [0], True, "cuda"),
        (True, ["2", "3"], True, "cuda"),
        (False, [], False, "cpu"),
        # CUDA devices visible but none reserved: they belong to someone else, the worker uses the CPU
        (False, [], True, "cpu"),
    ],
)
def test_the_worker_device_is_what_was_asked_for_and_assigned(
    use_gpu: bool, gpu_ids: list[Any], cuda: bool, device: str
) -> None:
    assert recipe.worker_device_type(use_gpu, gpu_ids, cuda) == device


@pytest.mark.parametrize(
    ("use_gpu", "gpu_ids", "cuda", "words"),
    [
        (True, [], True, "assigned this worker no GPU"),
        (True, [], False, "assigned this worker no GPU"),
        (True, [0], False, "GPU 0, but torch sees no CUDA device"),
        (False, ["1"], True, "use_gpu is false but Ray assigned this worker GPU 1"),
        (False, [1], False, "use_gpu is false but Ray assigned this worker GPU 1"),
    ],
)
def test_a_device_mismatch_is_refused_naming_both_sides(
    use_gpu: bool, gpu_ids: list[Any], cuda: bool, words: str
) -> None:
    with pytest.raises(DeviceMismatchError, match=words) as info:
        recipe.worker_device_type(use_gpu, gpu_ids, cuda)
    assert "scaling.use_gpu" in str(info.value)


def test_a_device_mismatch_reaches_the_driver_whole_and_is_not_retried() -> None:
    err = DeviceMismatchError("scaling.use_gpu is true but ...")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is DeviceMismatchError and str(again) == str(err)
    assert is_deterministic_error(again)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("amp", "device", "dtype"),
    [
        ("auto", "cuda", torch.float16),
        ("auto", "cpu", None),
        ("off", "cuda", None),
        (False, "cuda", None),
        ("fp16", "cuda", torch.float16),
        (True, "cuda", torch.float16),
        (True, "cpu", torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
    ],
)
def test_train_amp_gives_the_autocast_dtype(amp: Any, device: str, dtype: torch.dtype | None) -> None:
    spec = _spec(amp=amp)
    assert recipe.amp_dtype(spec, device) == dtype
    assert recipe.use_amp(spec, device) is (dtype is not None)


def test_fp16_on_cpu_is_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as info:
        recipe.amp_dtype(_spec(amp="fp16"), "cpu")
    assert dict(info.value.problems)["train.amp"].startswith("fp16 on cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bf16_where_torch_has_no_bf16_gpu_is_refused() -> None:
    with pytest.raises(SpecError, match="no bfloat16 support"):
        recipe.amp_dtype(_spec(amp="bf16"), "cuda")


@pytest.mark.parametrize(
    ("dtype", "enabled"), [(torch.float16, True), (torch.bfloat16, False), (None, False)]
)
def test_the_gradient_scaler_is_for_fp16_only(dtype: torch.dtype | None, enabled: bool) -> None:
    assert recipe.grad_scaler("cpu", dtype).is_enabled() is enabled


def test_a_bf16_training_step_on_cpu_runs_the_head_in_bf16(tmp_path: Path) -> None:
    """``train_epoch`` with the spec's ``amp_dtype``: the head computes in bf16 and the loss is finite."""
    from harmonic.detectors import pop_diagnostics
    from workers.training.epoch_metrics import train_epoch
    from workers.training.train_state import TrainParts

    spec = Spec.parse(
        {
            "name": "bf16",
            "dataset": {"format": "synthetic", "train": 4, "val": 2, "image_size": 64, "root": str(tmp_path)},
            "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 64},
            "train": {"epochs": 1, "batch_size": 2, "amp": "bf16", "aspect_ratio_groups": 0},
        }
    )
    dtype = recipe.amp_dtype(spec, "cpu")
    data = recipe.build_datasets(spec)
    model = recipe.build_model(spec, data.num_classes)
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda _m, _i, out: seen.append(out["cls_logits"].dtype))
    loader = recipe.train_loader(data.train, batch_size=2, aspect_ratio_groups=0, seed=0)
    optimizer = recipe.make_optimizer(model, spec)
    parts = TrainParts(
        model, optimizer, recipe.make_scheduler(optimizer, spec, 1), recipe.grad_scaler("cpu", dtype)
    )
    model.train()
    stats = train_epoch(
        model, loader.loader, parts, torch.device("cpu"), spec, epoch=1, rank=0,
        iters_per_epoch=loader.iters_per_epoch, use_amp=dtype is not None, amp_dtype=dtype,
        pop_diagnostics=pop_diagnostics,
    )  # fmt: skip
    assert seen and set(seen) == {torch.bfloat16}
    assert stats.steps == 2 and all(v == v and abs(v) < float("inf") for v in stats.loss_sums.values())


# --------------------------------------------------------------------------- end to end on Ray


@pytest.fixture(scope="module")
def fake_gpu_ray(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[Path]:
    """A local Ray that declares one GPU this machine does not have (HDET_HOME in a scratch folder)."""
    import ray

    if torch.cuda.is_available():
        pytest.skip("the fake GPU must be one torch cannot use")
    home = scratch(request, "hdet_home")
    old = os.environ.get("HDET_HOME")
    os.environ["HDET_HOME"] = str(home)
    start_test_ray(1, num_gpus=1)
    yield home
    ray.shutdown()
    if old is None:
        os.environ.pop("HDET_HOME", None)
    else:
        os.environ["HDET_HOME"] = old


@pytest.mark.integration
def test_a_gpu_training_on_a_node_without_cuda_is_refused_at_once(
    fake_gpu_ray: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml
    from mlflow import MlflowClient

    from workers.run import main as run_main

    home = fake_gpu_ray
    spec = {
        "name": "fake-gpu",
        "dataset": {"format": "synthetic", "train": 4, "val": 2, "image_size": 64},
        "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 64},
        "train": {"epochs": 1, "batch_size": 2},
        "scaling": {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1, "max_failures": 2},
        "tracking": {"experiment": "fake-gpu"},
    }
    path = home / "fake-gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{home / 'mlflow.db'}"
    assert run_main([str(path), "--tracking-uri", uri, "--storage-path", str(home / "storage")]) == 1
    assert "GPU 0, but torch sees no CUDA device" in capsys.readouterr().err
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("fake-gpu")
    assert exp is not None
    (child,) = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("hdet.role") == "child"]
    assert child.info.status == "FAILED"
    assert "torch sees no CUDA device" in child.data.tags["hdet.error"]
