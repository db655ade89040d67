from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Started in the background (`nohup pytest &`), this process and every child ignore SIGINT, and the Ctrl-C tests
# would fail for that alone: a handler set here is reset to the default in each child it starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one torch thread per worker (and its subprocesses), not two each on 2 cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A model and data small enough for a CPU test to train in seconds.
TINY = [
    "data=fake",
    "data.train_size=256",
    "data.val_size=64",
    "data.test_size=64",
    "data.eval_batch_size=64",
    "model.emb_size=16",
    "model.depth=1",
    "model.num_heads=2",
    "model.patch_size=8",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "~callbacks.test_figures",  # drawing its two figures is most of a tiny run's test (tests/test_report.py keeps them)
]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The config a ``python {name}.py`` run would get, with the run dir at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir.parent / "data")
        cfg.paths.log_dir = str(output_dir.parent)
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def make(overrides: list[str] = (), name: str = "train", run: str = "run", tiny: bool = True) -> DictConfig:
        base = [o for o in TINY if tiny and (name == "train" or o.startswith("trainer."))]
        return compose_config(name, [*base, *overrides], tmp_path / run)

    yield make
    GlobalHydra.instance().clear()


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int = 240, own_session: bool = False) -> subprocess.CompletedProcess:
    """``own_session``: the script leads a process group of its own, so a signal to its group reaches none of ours."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(ROOT / script), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=own_session)


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 32, suffix: str = ".png") -> Path:
    """A tiny ImageFolder tree: each class a flat colour (plus noise), in train/ and test/."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                base = torch.full((size, size, 3), 40 + 170 * i, dtype=torch.int32)
                pixels = (base + torch.randint(-30, 30, (size, size, 3), generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{j:04d}{suffix}")
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished training run (fake data, 10 classes), shared by the tests that need a checkpoint."""
    from vit.run import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_config("train", [*TINY, "trainer.max_epochs=1"], run))
    GlobalHydra.instance().clear()
    return run


def wandb_records(folder: Path, last: bytes, timeout_s: float = 60) -> bytes:
    """The protobuf records of the one W&B offline run in ``folder`` (what `wandb sync` uploads), once they hold
    ``last``: W&B's own service process writes them, and on a busy machine it may still be at it when a run returns."""
    (records,) = list(folder.glob("run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while last not in (data := records.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return data
