"""What a GPU node must pass before trainings are sent to it; at most 5 minutes on one GPU.

    scripts/gpu_smoke.sh                                # every arch, fp16, 320 px, 20 steps
    scripts/gpu_smoke.sh --amp bf16 --archs retinanet fcos

In order:

1. the environment: NVIDIA driver, torch and its CUDA/cuDNN build, each GPU (memory, compute
   capability, bf16 support);
2. the half-precision geometry: identical 400 px boxes in fp16 (and bf16) give IoU 1, and an FCOS
   head under autocast whose predicted boxes are large (past fp16's range as areas) gives the
   float32 run's IoUs;
3. every arch x {standard, harmonicdet} trains ``--steps`` steps under autocast (``--amp``; the
   gradient scaler with fp16) at ``--image-size`` px on a generated batch whose boxes reach 90% of
   the image: the loss must stay finite; the table gives images/s (after 3 warm-up steps), the peak
   GPU memory and the share of the positives' diagnostic IoUs equal to 0 (FCOS starts from
   degenerate boxes, whose IoU is 0 in float32 too, so its share says little: step 2 is the
   overflow test);
4. 3 DDP steps of 2 processes (NCCL, RetinaNet) when the node has 2 GPUs, which must end with equal
   replicas; otherwise it says skipped.

It prints one table and exits 1 if a check failed, 0 otherwise. Without a GPU it prints the
environment, says it needs a GPU and exits 0. ``--device cpu`` runs the same on the CPU under bf16
autocast (fp16 convolutions on a CPU are hundreds of times slower), for testing this script.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# torch is imported by the functions that use it: --help and a bad option answer at once
from harmonic.catalog import ARCHS, default_backbone, valid_backbones  # noqa: E402

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

KINDS = ("standard", "harmonicdet")
NUM_CLASSES = 4  # 3 foreground classes + background
WARMUP_STEPS = 3
#: ``--amp`` -> the torch dtype's name
AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_smoke.sh",
        description=(
            "GPU smoke test of this node (at most 5 minutes on one GPU): environment, half-precision "
            "geometry, every arch x {standard, harmonicdet} trained a few AMP steps, a 2-GPU DDP step, "
            "one table. Exit 0: passed, or no GPU (it says so); 1: a check failed."
        ),
    )
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="detectors (default: all)")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="fp16", help="autocast dtype (default fp16)")
    p.add_argument("--image-size", type=int, default=320, help="input side in px (default 320)")
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--steps", type=int, default=20, help="training steps per arch and loss (default 20)")
    p.add_argument("--backbone", default=None, help="backbone where the arch takes it (default: each arch's)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=230.0,
        help="no training starts after this many seconds, nor the DDP step 30 s later (default 230)",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: run under bf16 for testing this script",
    )
    args = p.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps must be > {WARMUP_STEPS} (the warm-up steps are not timed)")
    if args.batch < 1 or args.image_size < 64:
        p.error("--batch must be >= 1 and --image-size >= 64")
    return args


# --------------------------------------------------------------------------- environment


def _nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        return f"nvidia-smi failed: {e}"
    return ", ".join(sorted(set(out.split()))) or "unknown"


def environment(cuda: bool) -> list[tuple[str, str]]:
    """(name, value) rows: driver, torch and its CUDA build, each GPU."""
    import torch
    import torchvision

    rows = [
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("CUDA of the torch build", torch.version.cuda or "none (CPU build)"),
        ("cuDNN", str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"),
        ("NVIDIA driver", _nvidia_smi()),
        ("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")),
        ("GPUs torch sees", str(torch.cuda.device_count() if cuda else 0)),
    ]
    for i in range(torch.cuda.device_count() if cuda else 0):
        prop = torch.cuda.get_device_properties(i)
        rows.append(
            (
                f"cuda:{i}",
                f"{prop.name}, {prop.total_memory / 2**30:.0f} GiB, compute {prop.major}.{prop.minor}, "
                f"bf16 {'yes' if prop.major >= 8 else 'no'}",
            )
        )
    return rows


# --------------------------------------------------------------------------- data


def make_batch(
    n: int, size: int, device: torch.device, seed: int = 0
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``n`` noise images with 3 filled boxes each, sides from 1/8 to 9/10 of the image (so their
    areas pass fp16's 65504 from 256 px on), with labels and masks (Mask R-CNN), on ``device``."""
    from benchmarks.loss import synthetic_batch

    images, targets = synthetic_batch(n, size, NUM_CLASSES, seed, sides=(1 / 8, 0.9))
    return [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _backbone(arch: str, requested: str | None) -> str:
    return (
        requested if requested is not None and requested in valid_backbones(arch) else default_backbone(arch)
    )


# --------------------------------------------------------------------------- checks


def check_half_boxes(device: torch.device) -> list[tuple[str, bool, str]]:
    """Identical 400 px boxes in fp16 and bf16: IoU 1 (an fp16 area of 160000 is inf)."""
    import torch

    from harmonic.detectors.common import paired_iou

    out = []
    for name, dtype_name in AMP_DTYPES.items():
        boxes = torch.tensor([[0.0, 0.0, 400.0, 400.0]], device=device, dtype=getattr(torch, dtype_name))
        iou = float(paired_iou(boxes, boxes)[0])
        out.append((f"{name} IoU of identical 400 px boxes", iou == 1.0, f"{iou:g} (want 1)"))
    return out


def check_amp_fcos_iou(
    device: torch.device, dtype: torch.dtype, image_size: int, backbone: str | None
) -> tuple[str, bool, str]:
    """FCOS under autocast, its box offsets set to 12 (boxes 24x their anchor: areas past fp16's
    range): the diagnostic IoUs must be the float32 run's."""
    import torch

    from harmonic.detectors import build_detector, pop_diagnostics

    torch.manual_seed(0)
    model = build_detector(
        "fcos", NUM_CLASSES, loss="harmonicdet", backbone=_backbone("fcos", backbone), image_size=image_size
    ).to(device)

    def large_boxes(_m: nn.Module, _i: Any, out: dict[str, Tensor]) -> dict[str, Tensor]:
        out["bbox_regression"] = torch.full_like(out["bbox_regression"], 12.0)
        return out

    head: nn.Module = model.head  # type: ignore[assignment]
    head.register_forward_hook(large_boxes)
    images, targets = make_batch(1, image_size, device)
    ious = []
    for enabled in (False, True):
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            model(images, targets)
        ious.append(pop_diagnostics(model)["iou"])
    full, amp = ious
    diff = float((full - amp).abs().max()) if full.numel() else math.nan
    ok = full.numel() > 0 and diff < 1e-2
    zeros = float((amp == 0).float().mean()) if amp.numel() else math.nan
    return ("FCOS IoU under autocast = float32's", ok, f"max |diff| {diff:.2g}, IoU=0 {zeros:.0%}")


def train_steps(
    arch: str, kind: str, *, device: torch.device, dtype: torch.dtype, size: int, batch: int, steps: int,
    backbone: str | None,
) -> dict[str, Any]:  # fmt: skip
    """``steps`` AMP training steps of one arch and loss kind on a generated batch (lr warmed up
    linearly to 0.01, as the recipe's warm-up starts)."""
    import torch

    from harmonic.detectors import build_detector, pop_diagnostics
    from harmonic.step import optimizer_step, total_loss

    name = _backbone(arch, backbone)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = build_detector(arch, NUM_CLASSES, loss=kind, backbone=name, image_size=size).to(device)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.001 + 0.999 * min(1.0, i / steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images, targets = make_batch(batch, size, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    nonfinite, ious = 0, []
    t0 = time.perf_counter()
    for step in range(steps):
        if step == WARMUP_STEPS:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            losses = model(images, targets)
        loss = total_loss(losses)
        nonfinite += int(not torch.isfinite(loss.detach()).item())
        optimizer_step(loss, opt, scheduler=sched, scaler=scaler)
        diag = pop_diagnostics(model)
        if diag:
            ious.append(diag["iou"])
    if cuda:
        torch.cuda.synchronize(device)
    timed = time.perf_counter() - t0
    iou = torch.cat(ious) if ious else torch.zeros(0)
    return {
        "arch": arch, "loss": kind, "backbone": name, "finite": nonfinite == 0,
        "nonfinite": nonfinite, "img_s": batch * (steps - WARMUP_STEPS) / timed,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else math.nan,
        "iou0": float((iou == 0).float().mean()) if iou.numel() else math.nan,
        "seconds": time.perf_counter() - t_start, "note": "",
    }  # fmt: skip


# --------------------------------------------------------------------------- DDP


def _ddp_rank(rank: int, world: int, port: int, dtype_name: str, size: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from harmonic.detectors import build_detector
    from harmonic.step import optimizer_step, total_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.manual_seed(0)
        model = build_detector("retinanet", NUM_CLASSES, loss="harmonicdet", image_size=size).to(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.001, momentum=0.9)
        dtype = getattr(torch, AMP_DTYPES[dtype_name])
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        images, targets = make_batch(2, size, device, seed=rank)
        for _ in range(3):
            with torch.autocast("cuda", dtype=dtype):
                loss = total_loss(ddp(images, targets))
            optimizer_step(loss, opt, scaler=scaler)
        total = loss.detach().float().reshape(1)
        dist.all_reduce(total)
        # the replicas must hold the same weights after the synchronised steps
        weights = torch.cat([p.detach().float().sum().reshape(1) for p in model.parameters()])
        low, high = weights.clone(), weights.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        same = bool(torch.equal(low, high))
        if rank == 0:
            Path(out).write_text(f"{float(total):.6g} {int(same)}\n")
    finally:
        dist.destroy_process_group()


def ddp_smoke(dtype_name: str, size: int) -> tuple[str, bool | None, str]:
    """2 processes, one GPU each, 3 DDP steps; None when the node has fewer than 2 GPUs."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        return ("DDP, 2 processes (NCCL)", None, f"skipped: {torch.cuda.device_count()} GPU")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp.txt")
        try:
            mp.spawn(_ddp_rank, args=(2, port, dtype_name, size, out), nprocs=2, join=True)
            total, same = Path(out).read_text().split()
        except Exception as e:  # noqa: BLE001 - the table reports whatever went wrong
            return ("DDP, 2 processes (NCCL)", False, f"{type(e).__name__}: {e}".splitlines()[0][:120])
    ok = math.isfinite(float(total)) and same == "1"
    detail = f"summed loss {total}, replicas {'equal' if same == '1' else 'DIFFER'}"
    return ("DDP, 2 processes (NCCL)", ok, f"{detail}, {time.perf_counter() - t0:.0f} s")


# --------------------------------------------------------------------------- report


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def table(checks: list[tuple[str, bool | None, str]], rows: list[dict[str, Any]], amp: str, size: int) -> str:
    lines = ["", "check                                      result  detail"]
    for name, ok, detail in checks:
        lines.append(f"{name:<42} {'skip' if ok is None else 'ok' if ok else 'FAIL':<7} {detail}")
    lines += [
        "",
        f"training: {amp} autocast, {size} px",
        f"{'arch':<12}{'loss':<13}{'backbone':<15}{'finite':<8}{'img/s':>8}{'peak MiB':>10}{'IoU=0':>8}{'s':>6}  note",
    ]
    for r in rows:
        finite = "-" if r["finite"] is None else "yes" if r["finite"] else f"NO {r['nonfinite']}"
        lines.append(
            f"{r['arch']:<12}{r['loss']:<13}{r['backbone']:<15}{finite:<8}{_fmt(r['img_s'], '.1f'):>8}"
            f"{_fmt(r['peak_mib'], '.0f'):>10}{_fmt(r['iou0'], '.1%'):>8}{_fmt(r['seconds'], '.1f'):>6}  {r['note']}"
        )
    return "\n".join(lines)


def _not_run(arch: str, kind: str, backbone: str | None, note: str) -> dict[str, Any]:
    nan = math.nan
    return {
        "arch": arch, "loss": kind, "backbone": _backbone(arch, backbone), "finite": None, "nonfinite": 0,
        "img_s": nan, "peak_mib": nan, "iou0": nan, "seconds": nan, "note": note,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    print("environment")
    for name, value in environment(cuda):
        print(f"  {name:<26} {value}")
    if args.device == "cuda" and not cuda:
        print(
            "gpu_smoke: needs a GPU, and torch sees none here; nothing checked (--device cpu runs it on the CPU)"
        )
        return 0
    device = torch.device(args.device)
    amp = args.amp if device.type == "cuda" else "bf16"
    dtype = getattr(torch, AMP_DTYPES[amp])

    checks: list[tuple[str, bool | None, str]] = [*check_half_boxes(device)]
    try:
        checks.append(check_amp_fcos_iou(device, dtype, args.image_size, args.backbone))
    except Exception as e:  # noqa: BLE001 - the table reports whatever went wrong
        checks.append(("FCOS IoU under autocast = float32's", False, f"{type(e).__name__}: {e}"[:120]))

    rows: list[dict[str, Any]] = []
    for arch in args.archs:
        for kind in KINDS:
            if time.perf_counter() - t_start > args.budget_s:
                rows.append(_not_run(arch, kind, args.backbone, "skipped: --budget-s spent"))
                continue
            try:
                rows.append(
                    train_steps(
                        arch,
                        kind,
                        device=device,
                        dtype=dtype,
                        size=args.image_size,
                        batch=args.batch,
                        steps=args.steps,
                        backbone=args.backbone,
                    )  # fmt: skip
                )
            except Exception as e:  # noqa: BLE001 - one arch's failure must not hide the others'
                row = _not_run(arch, kind, args.backbone, f"{type(e).__name__}: {e}".splitlines()[0][:100])
                rows.append({**row, "finite": False})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  trained {arch} {kind} ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if device.type != "cuda":
        checks.append(("DDP, 2 processes (NCCL)", None, "skipped: no GPU"))
    elif time.perf_counter() - t_start > args.budget_s + 30:
        checks.append(("DDP, 2 processes (NCCL)", None, "skipped: --budget-s spent"))
    else:
        checks.append(ddp_smoke(amp, args.image_size))

    print(table(checks, rows, amp, args.image_size))
    failed = [name for name, ok, _ in checks if ok is False] + [
        f"{r['arch']} {r['loss']}" for r in rows if r["finite"] is False
    ]
    skipped = [f"{r['arch']} {r['loss']}" for r in rows if r["finite"] is None]
    print(
        f"\n{'FAILED: ' + ', '.join(failed) if failed else 'passed'}"
        f"{'; not run: ' + ', '.join(skipped) if skipped else ''} ({time.perf_counter() - t_start:.0f} s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
