"""Classify images with a trained checkpoint, the manual's penguin demo done with a trained model.

    python -m vit.predict ckpt=RUN_DIR_OR_FILE image=PATH_OR_DIR [top_k=5] [attention=true]

Any image (any size, grayscale, RGBA, PNG or JPEG) becomes the model's input exactly as the
training data did. A directory gets a ``predictions.csv``; ``attention=true`` writes an
attention-rollout overlay PNG per image. Outputs go to ``outputs/predict/<date>/<time>_<us>``.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from vit import checkpoints
from vit.builders import evaluation_module
from vit.cli import check_command_line, run_reporting_errors
from vit.errors import ConfigError, require_int
from vit.images import IMAGE_SUFFIXES, decode_image, to_model_input

log = logging.getLogger(__name__)


def image_files(path: str | None) -> list[Path]:
    if not path:
        raise ConfigError("no image given: image=PATH (a file, or a directory of images)")
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"image={root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def model_input(files: list[Path], data: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images as stored for training, their model input)."""
    images = torch.stack([decode_image(f, data.get("stored_size", 32)) for f in files])
    return images, to_model_input(images, data["mean"], data["std"], data.get("image_size"))


def overlay(image: torch.Tensor, saliency: torch.Tensor, title: str, path: Path) -> None:
    """Writes the image with the rollout heat map blended lightly over it and a colour scale, beside the image alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = image.permute(1, 2, 0).numpy()
    heat = torch.nn.functional.interpolate(saliency[None, None], size=picture.shape[:2], mode="bilinear")[0, 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.6, 3.2), dpi=100)
    left.imshow(picture, interpolation="nearest")
    left.set_title("input", fontsize=9)
    right.imshow(picture, interpolation="nearest")
    heatmap = right.imshow(heat.numpy(), cmap="jet", alpha=0.35, vmin=0, vmax=1, interpolation="bilinear")  # light: the image shows through
    right.set_title("attention rollout", fontsize=9)
    for ax in (left, right):
        ax.axis("off")
    bar = fig.colorbar(heatmap, ax=right, fraction=0.046, pad=0.04)
    bar.set_label("share of attention (1 = the most-attended patch)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for every image; returns one dict per image."""
    require_int("top_k", cfg.top_k)
    module = evaluation_module(checkpoints.resolve(cfg.get("ckpt")))
    net, config = module.net, module.hparams["config"]
    if cfg.attention and not getattr(net, "has_attention", hasattr(net, "attention_rollout")):
        name = config["model"].get("name") or config["model"]["_target_"].rsplit(".", 1)[-1]
        raise ConfigError(f"the model {name} has no attention maps: leave out attention=true")
    classes = config.get("classes") or [f"class{i}" for i in range(net.n_classes)]
    files = image_files(cfg.get("image"))
    out_dir = Path(cfg.paths.output_dir)
    results = []
    for start in range(0, len(files), cfg.batch_size):
        batch = files[start : start + cfg.batch_size]
        images, x = model_input(batch, config["data"])
        with torch.no_grad():
            probs = module.evaluation_logits(x).softmax(dim=-1)  # as test.py judges it (module.tta_flip)
        top = probs.topk(min(cfg.top_k, len(classes)), dim=-1)
        saliency = patch_saliency(net, x) if cfg.attention else None
        for i, path in enumerate(batch):
            ranked = [(classes[j], float(p)) for p, j in zip(top.values[i], top.indices[i])]
            result = {"image": str(path), "top": ranked}
            print(f"{path}: " + ", ".join(f"{name} {100 * p:.2f}%" for name, p in ranked))
            if saliency is not None:
                target = out_dir / "attention" / f"{start + i:05d}_{path.stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                overlay(images[i], saliency[i], f"{path.name}: {ranked[0][0]} {100 * ranked[0][1]:.1f}%", target)
                print(f"  attention overlay: {target}")
                result["attention"] = str(target)
            results.append(result)
    if len(files) > 1 or Path(cfg.image).is_dir():
        write_csv(results, out_dir / "predictions.csv")
    return results


def patch_saliency(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(b, h, w) share of each patch in the pooled output: the rollout rows of the tokens the head pools, averaged.

    The manual's head averages all tokens; timm's ViTs take the class token (``global_pool="token"``) or the
    mean of the patch tokens (``"avg"``), after ``num_prefix_tokens`` class (and register) tokens.
    """
    rollout = net.attention_rollout(x)  # b n n
    prefix = getattr(net, "num_prefix_tokens", 1)
    pooled = {"token": rollout[:, :1], "avg": rollout[:, prefix:]}.get(getattr(net, "global_pool", None), rollout)
    weights = pooled.mean(dim=1)[:, prefix:]  # drop the class token's columns
    side = int(weights.shape[-1] ** 0.5)
    weights = weights.view(-1, side, side)
    return weights / weights.amax(dim=(1, 2), keepdim=True)


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prediction", "probability", "top_k"])
        for r in results:
            writer.writerow([r["image"], r["top"][0][0], f"{r['top'][0][1]:.4f}", ";".join(f"{n}:{p:.4f}" for n, p in r["top"])])
    print(f"Predictions written to {path}")


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> list[dict[str, Any]]:
    return run_reporting_errors(predict, cfg)


if __name__ == "__main__":
    check_command_line(Path(__file__).parents[1] / "conf", "predict", sys.argv[1:])
    main()
