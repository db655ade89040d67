"""Each preset's optimizer, pinned: the figures recorded for a preset were trained with this optimizer, so a change to
it (in the preset or in the optimizer config it names) has to change this table too, on purpose."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": 0.0}
MUON = {"_target_": "vit.optim.MuonAdamW", "weight_decay": 0.05, "betas": [0.9, 0.999], "momentum": 0.95, "ns_steps": 5, "split_qkv": False}
PINNED = {
    None: ADAM,  # python train.py: the manual's Adam 1e-3
    "assignment": ADAM,  # its sweep overrides optim.lr per job
    "seed": ADAM,
    "seed_fixed": ADAM,
    "fast": {**MUON, "lr": 3e-3, "muon_convs": False},
    "budget": {**MUON, "lr": 1.5e-3, "muon_convs": True},  # optim=muon_convs since 2026-12-07
    "budget_max": {**MUON, "lr": 1.5e-3, "muon_convs": True},  # optim=muon_convs since 2026-12-07 night
    "small_strong": {"_target_": "torch.optim.AdamW", "lr": 2e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]},
    "cifar_best": {"_target_": "torch.optim.AdamW", "lr": 2e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]},
    "finetune": {"_target_": "torch.optim.AdamW", "lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.999]},
}


def test_every_preset_is_pinned():
    assert {p.stem for p in (CONF / "experiment").glob("*.yaml")} == set(PINNED) - {None}


@pytest.mark.parametrize("experiment", list(PINNED), ids=str)
def test_each_presets_optimizer_is_the_pinned_one(make_cfg, experiment):
    cfg = make_cfg([f"experiment={experiment}"] if experiment else [], tiny=False)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    assert optim.pop("_partial_") is True
    assert optim == PINNED[experiment]


def test_each_final_preset_trains_in_the_precision_its_figures_were_measured_in(make_cfg):
    """fast's and budget's figures are bf16 (the CPU's default, null); budget_max's fp32, pinned until bf16 has test figures
    for it (budget_max inherits budget's config, so a change to budget would otherwise reach it unmeasured)."""
    rows = {row["name"]: row.get("precision") for row in json.loads((CONF.parent / "docs" / "frontier.json").read_text())["rows"]}
    for name, pinned in (("fast", None), ("budget", None), ("budget_max", "32-true")):
        assert make_cfg([f"experiment={name}"], tiny=False).trainer.precision == pinned, name
        assert rows[name] == (pinned or "bf16-mixed"), name
