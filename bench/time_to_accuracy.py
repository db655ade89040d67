"""Time to the manual's 67.09% test accuracy: the manual's recipe as printed against this project's fastest config.

Why: throughput alone hides what matters to a user, the wall-clock until a model is as good as the
manual's. Both sides start the clock before their data is loaded (so decoding, caching and compilation
count), test on the full test split after every epoch, and stop at the first epoch that reaches the target.

- manual: the loop as printed (torchvision ImageFolder with its PIL transform, DataLoader(batch_size=32,
  shuffle=True, num_workers=2), its model with its attention formula computed by einsum, Adam 1e-3, fp16
  autocast + GradScaler on CUDA), up to 20 epochs, and its test code after each epoch;
- ours: ``vit.run``'s builders on the project's config plus the overrides given with ``--ours``
  (default: the small_strong preset, compiled, batch 512), the same model size.

    python bench/time_to_accuracy.py --device cuda
    python bench/time_to_accuracy.py --device cpu --data fake --target 0.5 --max-epochs 3   # a smoke run

With ``--data fake`` the two sides see different synthetic data (torchvision's FakeData, random labels,
against the project's learnable fake set): a smoke run of the code, not a comparison.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from throughput import compose_run, device_name, now  # the sibling script: same clock, device name and config
from vit.model import ViT
from vit.run import build_for_fit, build_trainer

OURS_DEFAULT = ["experiment=small_strong", "model.compile=true", "data.batch_size=512", "data.eval_batch_size=1024", "optim.lr=4e-3"]


class TestAccuracyEachEpoch(L.Callback):
    """After every training epoch: accuracy on the whole test split and the time since ``start``; stops at ``target``."""

    def __init__(self, start: float, target: float, device: torch.device):
        self.start, self.target, self.device = start, target, device
        self.curve: list[tuple[int, float, float]] = []  # (epoch, seconds, accuracy)

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        datamodule.setup("test")
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        for images, labels in datamodule.test_dataloader():
            images, labels = images.to(pl_module.device), labels.to(pl_module.device)
            with torch.autocast(pl_module.device.type, dtype=torch.float16, enabled=pl_module.device.type == "cuda"):
                logits = pl_module(datamodule.preprocess(images))
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
        pl_module.train(was_training)
        accuracy = correct / total
        self.curve.append((trainer.current_epoch + 1, now(self.device) - self.start, accuracy))
        print(f"  ours: epoch {trainer.current_epoch + 1}, {self.curve[-1][1]:.1f} s, test accuracy {100 * accuracy:.2f}%", flush=True)
        if accuracy >= self.target:
            trainer.should_stop = True


def run_manual(args: argparse.Namespace) -> list[tuple[int, float, float]]:
    device, cuda = args.device, args.device.type == "cuda"
    start = now(device)
    torch.manual_seed(args.seed)
    transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    if args.data == "folder":
        train_set = torchvision.datasets.ImageFolder(str(args.root / "train"), transform=transform)
        test_set = torchvision.datasets.ImageFolder(str(args.root / "test"), transform=transform)
    else:
        train_set = torchvision.datasets.FakeData(2000, (3, 32, 32), 10, transform=transform, random_offset=0)
        test_set = torchvision.datasets.FakeData(500, (3, 32, 32), 10, transform=transform, random_offset=10**6)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2)
    test_loader = DataLoader(test_set, batch_size=32, shuffle=False, num_workers=2)
    model = ViT(in_channels=3, patch_size=4, emb_size=64, img_size=32, depth=12, n_classes=10, seed_attention=True, fused=False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    curve = []
    for epoch in range(args.max_epochs):
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                loss = criterion(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                predicted = model(images.to(device)).argmax(1)
                correct += int((predicted == labels.to(device)).sum())
                total += len(labels)
        curve.append((epoch + 1, now(device) - start, correct / total))
        print(f"  manual: epoch {epoch + 1}, {curve[-1][1]:.1f} s, test accuracy {100 * correct / total:.2f}%", flush=True)
        if correct / total >= args.target:
            break
    return curve


def run_ours(args: argparse.Namespace, output_dir: Path) -> list[tuple[int, float, float]]:
    start = now(args.device)
    cfg = compose_run(args, output_dir, [*args.ours, f"trainer.max_epochs={args.max_epochs}", "data.val_size=0"])
    L.seed_everything(cfg.seed, verbose=False)
    datamodule, _, module = build_for_fit(cfg)
    stopper = TestAccuracyEachEpoch(start, args.target, args.device)
    trainer = build_trainer(cfg, [stopper], limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return stopper.curve


def first_at(curve: list[tuple[int, float, float]], target: float) -> str:
    hit = next(((e, s) for e, s, a in curve if a >= target), None)
    best = max((a for _, _, a in curve), default=0.0)
    return f"{hit[1]:.1f} s (epoch {hit[0]})" if hit else f"not reached in {len(curve)} epochs (best {100 * best:.2f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", type=float, default=0.6709, help="test accuracy to reach (default: the manual's 67.09%%)")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--data", choices=("folder", "fake"), default="folder")
    parser.add_argument("--root", type=Path, default=Path("../shared/data/cifar10-jpeg"))
    parser.add_argument("--data-dir", type=Path, default=None, help="paths.data_dir, where data=folder caches decoded images")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ours", nargs="*", default=OURS_DEFAULT, help="config overrides of our run (default: %(default)s)")
    parser.add_argument("--skip-manual", action="store_true")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    print(f"device: {device_name(args.device)}; target {100 * args.target:.2f}% test accuracy; data {args.data}", flush=True)
    manual = [] if args.skip_manual else run_manual(args)
    with tempfile.TemporaryDirectory(prefix="vit-tta-") as tmp:
        ours = run_ours(args, Path(tmp))
    print()
    if not args.skip_manual:
        print(f"manual's recipe:         {first_at(manual, args.target)}")
    print(f"ours ({' '.join(args.ours)}): {first_at(ours, args.target)}")


if __name__ == "__main__":
    main()
