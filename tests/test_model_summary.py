"""The model summary every run prints: its FLOP count is that of a forward pass over one image, not 0."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import ROOT
from vit.builders import build_net
from vit.run import train

MEASUREMENTS = ROOT / "docs" / "measurements.md"


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


@pytest.mark.parametrize("preset", ["fast", "budget", "budget_max"])
def test_the_flop_table_of_todays_presets_is_their_count(make_cfg, preset):
    """docs/measurements.md's row of each preset: forward + backward MFLOP per image at each training size, as
    ``vit.flops.count_step_flops`` counts a step of the net its config builds now, and its epochs at each size."""
    from vit.flops import count_step_flops

    row = re.search(rf"^\| `{preset}` \| [^|]+ \| ([\d./ -]+) \| [\d.]+ \| (\d+) / (\d+) / (\d+) \|", MEASUREMENTS.read_text(), re.M)
    assert row, f"docs/measurements.md has no FLOP row for {preset}"
    cfg = make_cfg([f"experiment={preset}"], tiny=False)
    net = build_net({**OmegaConf.to_container(cfg.model, resolve=True), "compile": False}, 10, pretrained=False).train()
    sizes = list(cfg.data.train_sizes)
    for side, quoted in zip((16, 24, 32), row.group(1).split(" / ")):
        if quoted.strip() == "-":
            assert side not in sizes
            continue
        x, y = torch.randn(2, 3, side, side), torch.randint(0, 10, (2,))
        assert count_step_flops(net, x, y)[0] / 2 / 1e6 == pytest.approx(float(quoted), abs=0.06), f"{preset} at {side} px"
    epochs = [sizes[min(epoch, len(sizes) - 1)] for epoch in range(cfg.trainer.max_epochs)]  # the last size holds to the end
    assert [epochs.count(side) for side in (16, 24, 32)] == [int(n) for n in row.groups()[1:]]
