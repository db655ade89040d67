"""The model summary every run prints: its FLOP count is that of a forward pass over one image, not 0."""

from __future__ import annotations

import re

import torch
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from torch.utils.flop_counter import FlopCounterMode

from vit.builders import build_net
from vit.run import train


def test_a_runs_model_summary_counts_the_forward_flops_of_one_image(make_cfg, capsys):
    cfg = make_cfg(["trainer.enable_model_summary=true", "trainer.max_epochs=1", "model.fused=true"])
    train(cfg)
    printed = re.search(r"Total FLOPs\W+([\d.]+ ?\w?)", capsys.readouterr().out)
    assert printed, "the run printed no model summary with FLOPs"
    # The same net counted another way: attention by the plain einsum path (fused=false), whose matmuls are counted as
    # they run; the run's net took the fused kernel, which FlopCounterMode does not count on a CPU.
    net = build_net({**cfg.model, "fused": False}, num_classes=10).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() > 0
    assert printed.group(1).strip() == get_human_readable_count(counter.get_total_flops()).strip()
