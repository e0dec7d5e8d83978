#!/usr/bin/env python
"""Train the Fashion-MNIST model zoo of :mod:`omse.zoo.fmnist` reproducibly on the CPU.

Usage::

    python scripts/train_fmnist.py --arch fmnist-resnet20            # default epochs
    python scripts/train_fmnist.py --arch all --out-dir /tmp/zoo      # all three in sequence

Recipe (identical for every net): fixed seed, ``torch.use_deterministic_algorithms(True)``,
one CPU thread by default, batch 128, augmentation = random 28x28 crop of the image zero-padded
by 2 pixels + random horizontal flip, SGD (momentum 0.9, Nesterov, weight decay 5e-4 on conv
and linear weights only) with a one-cycle cosine learning-rate schedule, cross-entropy loss.
The final model (no early stopping, no selection on the test set) is evaluated once on the 10k
test images, written atomically to ``<out-dir>/<arch>.safetensors`` and its record merged
into ``<out-dir>/fmnist_zoo.json``.

Runs are bit-for-bit repeatable for the same torch build, thread count and CPU instruction set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from omse.zoo.fmnist import ARCHS, WEIGHTS_DIR, load_fmnist, normalize

DEFAULT_EPOCHS = {"fmnist-resnet20": 7, "fmnist-mobilenetv2": 7, "fmnist-vgg": 9}
DEFAULT_MAX_LR = {"fmnist-resnet20": 0.1, "fmnist-mobilenetv2": 0.1, "fmnist-vgg": 0.05}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero-padding by ``pad`` + random horizontal flip.

    x float32 ``[B, 1, 28, 28]`` (normalized; padding uses the value of a black pixel)
    -> float32 ``[B, 1, 28, 28]``.
    """
    b, _, h, w = x.shape
    black = float(normalize(torch.zeros(1, 1, 1, dtype=torch.uint8)).item())
    padded = F.pad(x, (pad, pad, pad, pad), value=black)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # [B, W]
    rows = torch.arange(h) + dy[:, None]  # [B, H]
    out = padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 200) -> float:
    """Top-1 accuracy (fraction) of ``model`` on x ``[N, 1, 28, 28]``, y ``[N]``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def atomic_write_bytes(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` on a temp file next to ``path``, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def update_record(json_path: Path, name: str, record: dict) -> None:
    records = json.loads(json_path.read_text()) if json_path.is_file() else {}
    records[name] = record
    text = json.dumps(dict(sorted(records.items())), indent=2) + "\n"
    atomic_write_bytes(json_path, lambda tmp: Path(tmp).write_text(text))


def train_one(name: str, args: argparse.Namespace) -> dict:
    epochs = args.epochs or DEFAULT_EPOCHS[name]
    max_lr = args.lr or DEFAULT_MAX_LR[name]
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train_u8, y_train = load_fmnist("train", args.root)
    x_test_u8, y_test = load_fmnist("test", args.root)
    if args.train_limit:
        x_train_u8, y_train = x_train_u8[: args.train_limit], y_train[: args.train_limit]
    x_train, x_test = normalize(x_train_u8), normalize(x_test_u8)

    model = ARCHS[name]()
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        param_groups(model, args.weight_decay), lr=max_lr, momentum=0.9, nesterov=True
    )
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=0.2,
        anneal_strategy="cos",
        div_factor=10.0,
        final_div_factor=100.0,
    )
    print(
        f"[{name}] params={n_params} epochs={epochs} max_lr={max_lr} seed={args.seed}", flush=True
    )

    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{name} epoch {epoch + 1}/{epochs}",
            file=sys.stdout,
            mininterval=30.0,
            disable=args.no_progress,
        )
        for step in bar:
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            xb = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        print(
            f"[{name}] epoch {epoch + 1}/{epochs} train_loss={loss_sum / seen:.4f} "
            f"train_acc={correct / seen:.4f} elapsed={time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    train_seconds = time.perf_counter() - t0

    model = model.to(memory_format=torch.contiguous_format).eval()
    test_top1 = evaluate(model, x_test, y_test)
    first1k = evaluate(model, x_test[:1000], y_test[:1000])
    print(f"[{name}] test top-1 (10k) = {test_top1:.4f}, first 1k = {first1k:.4f}", flush=True)

    out_dir = Path(args.out_dir)
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights, lambda tmp: save_file(state, tmp, metadata={"arch": name}))
    record = {
        "test_top1": round(test_top1, 4),
        "test_top1_first1k": round(first1k, 4),
        "epochs": epochs,
        "seed": args.seed,
        "params": n_params,
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "optimizer": f"SGD(momentum=0.9, nesterov, wd={args.weight_decay})",
        "schedule": f"OneCycleLR(max_lr={max_lr}, cos, pct_start=0.2)",
        "augmentation": "random crop (zero pad 2) + horizontal flip",
        "train_images": len(x_train),
    }
    update_record(out_dir / "fmnist_zoo.json", name, record)
    print(f"[{name}] wrote {weights} ({record['weights_bytes']} bytes)", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=[*ARCHS, "all"])
    p.add_argument("--epochs", type=int, default=None, help="default: per-arch (see source)")
    p.add_argument("--out-dir", default=str(WEIGHTS_DIR))
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak LR; default per-arch")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N (smoke test)")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    names = list(ARCHS) if args.arch == "all" else [args.arch]
    for name in names:
        train_one(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
