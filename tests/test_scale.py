"""Scaling out: DDP on 2 CPU processes, the joblib and submitit launchers, the Optuna search, the SLURM preset."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import CONF, TINY, run_script
from vit import augment, cli, parallel, run
from vit.batches import EpochBatches
from vit.data import FakeDataModule
from vit.errors import ConfigError

# One short epoch per job: what the launcher tests need is jobs, not learning.
SMALL = TINY + [
    "data.train_size=128",
    "data.val_size=32",
    "data.test_size=32",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def writer_pids(tensorboard_dir: Path) -> set[str]:
    """The pids of the processes that wrote the event files (events.out.tfevents.<time>.<host>.<pid>.<n>)."""
    return {p.name.split(".")[-2] for p in tensorboard_dir.glob("events.out.tfevents.*")}


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# --- DDP ---------------------------------------------------------------------------------------------------------


def test_epoch_batches_give_each_rank_a_disjoint_share_of_the_same_order():
    def shares(n, shuffle, even):
        out = []
        for rank in range(2):
            sampler = EpochBatches(n, 4, shuffle, seed=7, num_replicas=2, rank=rank, even_shares=even)
            sampler.set_epoch(3)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            out.append(torch.cat(batches))
        return out

    single = EpochBatches(11, 4, shuffle=True, seed=7)
    single.set_epoch(3)
    order = torch.cat(list(single))
    a, b = shares(11, shuffle=True, even=True)  # training: equal shares, the last index of the order left out
    assert len(a) == len(b) == 5 and torch.equal(torch.cat([a, b]), order[:10])
    a, b = shares(11, shuffle=False, even=False)  # evaluation: every index exactly once
    assert (len(a), len(b)) == (6, 5) and torch.cat([a, b]).tolist() == list(range(11))


def test_the_datamodule_shards_by_the_trainers_rank_with_the_same_split_everywhere():
    loaders = []
    for rank in range(2):
        dm = FakeDataModule(train_size=101, val_size=21, test_size=9, batch_size=8, eval_batch_size=4)
        dm.setup()
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        loaders.append((dm, {name: [y for _, y in getattr(dm, f"{name}_dataloader")()] for name in ("train", "val", "test")}))
    (dm0, l0), (dm1, l1) = loaders
    assert torch.equal(dm0.val_set.images, dm1.val_set.images)  # the split is seeded, not per rank
    assert len(l0["train"]) == len(l1["train"]) and sum(map(len, l0["train"])) == sum(map(len, l1["train"])) == 40
    for name, data in (("val", dm0.val_set), ("test", dm0.test_set)):
        assert torch.equal(torch.cat(l0[name] + l1[name]), data.labels)  # every image once, in order


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_set_of_synced_results(tmp_path, make_cfg):
    # 129 val and test images in batches of 64: rank 0 gets 65 (2 batches), rank 1 64 (1 batch), and the synced
    # metrics must still be one process's; 127 training images: 63 each, one left out.
    run_dir = tmp_path / "ddp"
    probe = ["data.augment=true", "+callbacks.probe._target_=tests.faults.SaveAugmentation", f"+callbacks.probe.out_dir={tmp_path}"]
    result = run_script(
        "train.py",
        *TINY,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "data.val_size=129",
        "data.test_size=129",
        *probe,
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MEMBER: 2/2" in output and "distributed_backend=gloo" in output

    metrics = json.loads((run_dir / "metrics.json").read_text())
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {tag: [e.value for e in events.Scalars(tag)] for tag in ("val/acc", "test/acc", "test/loss")}
    assert metrics["epochs"] == 2 and metrics["val/acc"] == pytest.approx(max(logged["val/acc"]))  # the best epoch's
    for tag in ("test/acc", "test/loss"):  # logged by the test, and again with the HPARAMS
        assert logged[tag] == pytest.approx([metrics[tag]] * len(logged[tag]))
    assert len(writer_pids(run_dir / "tensorboard")) == 1  # one TensorBoard log, from rank 0
    assert "Metrics written" in (run_dir / "train.log").read_text()
    assert "Metrics written" not in (run_dir / "train_ddp_process_1.log").read_text()  # rank 1 ran, and wrote nothing
    assert json.loads((run_dir / "run.json").read_text())["ckpt"].startswith(str(run_dir / "checkpoints"))
    # Each rank its own augmentation stream: the same images come out of the two ranks augmented differently.
    augmented = [torch.load(tmp_path / f"augment_rank{rank}.pt") for rank in range(2)]
    assert augmented[0].shape == augmented[1].shape and not torch.equal(augmented[0], augmented[1])

    # The same checkpoint tested by one process: the same figures, so rank 0 reported all 129 images, not its 65.
    retested = run.test(make_cfg([f"ckpt={run_dir}"], name="test", run="retest"))
    assert retested["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert retested["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)


@pytest.mark.slow
def test_test_py_under_ddp_writes_metrics_from_rank_0_only(tmp_path, trained_run):
    run_dir = tmp_path / "test_ddp"
    result = run_script(
        "test.py",
        f"ckpt={trained_run}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    assert "Metrics written" in (run_dir / "test.log").read_text()
    rank_1_log = run_dir / "train_ddp_process_1.log"  # Lightning names every relaunched rank's Hydra job so
    assert "Metrics written" not in rank_1_log.read_text()  # rank 1 tested its share and wrote nothing
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] == json.loads((trained_run / "metrics.json").read_text())["test/acc"]


def test_augmentation_streams_depend_on_seed_rank_and_batch_only():
    def augmented(seed, rank, epoch, batch):
        dm = FakeDataModule(train_size=8, test_size=4, val_size=0, augment=True, trivial_augment=True, seed=seed)
        images = torch.arange(2 * 3 * 32 * 32).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
        return dm.preprocess(images, training=True, generator=dm.augment_generator(rank, epoch, batch, images.device))

    def mixed(seed, rank, epoch, batch):
        x, y = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8)
        return augment.mix(x, y, mixup_alpha=0.4, cutmix_alpha=1.0, generator=augment.batch_generator(seed, rank, epoch, batch, "cpu", "mix"))

    first, first_mix = augmented(1, 0, 2, 3), mixed(1, 0, 2, 3)
    assert torch.equal(first, augmented(1, 0, 2, 3)) and torch.equal(first_mix[0], mixed(1, 0, 2, 3)[0])  # reproducible
    for other in [(2, 0, 2, 3), (1, 1, 2, 3), (1, 0, 3, 3), (1, 0, 2, 4)]:
        assert not torch.equal(first, augmented(*other)) and not torch.equal(first_mix[0], mixed(*other)[0])


def test_ddp_inside_a_sweep_stops_and_points_at_one_job_per_gpu(make_cfg):
    cfg = make_cfg(["trainer=ddp", "trainer.devices=2", "hydra.mode=MULTIRUN"])
    with pytest.raises(ConfigError, match=r"inside a -m sweep.*hydra/launcher=joblib hydra\.launcher\.n_jobs=<GPUs> trainer\.devices=1"):
        run.train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_ddp_preset_and_the_trainer_defaults(make_cfg):
    cfg = make_cfg(["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    assert cfg.trainer.use_distributed_sampler is False  # the DataModules shard for themselves


# --- Launchers ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_joblib_runs_jobs_on_two_workers_and_the_report_has_them_all(tmp_path):
    result = run_script(
        "train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=1e-3,2e-3", *SMALL, f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    rows = read_csv(tmp_path / "summary.csv")
    assert sorted(r["job"] for r in rows) == ["0", "1"] and all(r["status"] == "ok" for r in rows)
    assert {r["lr"] for r in rows} == {"0.001", "0.002"}
    assert len(set().union(*(writer_pids(tmp_path / r["job"] / "tensorboard") for r in rows))) == 2  # two worker processes


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    result = run_script("train.py", "-m", "hydra/launcher=submitit_local", "optim.lr=1e-3,2e-3", *SMALL, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "summary.csv")
    assert sorted(r["job"] for r in rows) == ["0", "1"] and all(r["status"] == "ok" and r["test_acc"] for r in rows)
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl"))


def test_one_gpu_per_joblib_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(parallel.OneGpuPerJob, "gpu", None)
    monkeypatch.setattr(parallel.OneGpuPerJob, "lock", None)
    callback = parallel.OneGpuPerJob()

    def job(num: int, launcher: str = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"):
        config = OmegaConf.create({"hydra": {"launcher": {"_target_": launcher}, "sweep": {"dir": str(tmp_path)}, "job": {"num": num}}})
        callback.on_job_start(config=config)
        return parallel.OneGpuPerJob.gpu

    def new_worker():  # another process: the parent's environment, no class state yet
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
        parallel.OneGpuPerJob.gpu = parallel.OneGpuPerJob.lock = None

    assert job(0, launcher="hydra._internal.core_plugins.basic_launcher.BasicLauncher") is None  # jobs in turn: no pinning
    first = job(0)
    first_lock = parallel.OneGpuPerJob.lock
    assert first == "3" and job(2) == "3"  # a worker keeps its GPU for its later jobs
    new_worker()
    assert job(1) == "5"
    second_lock = parallel.OneGpuPerJob.lock
    new_worker()
    assert job(4) == "3"  # a third worker for two GPUs shares, with a warning
    for lock in (first_lock, second_lock):
        lock.close()
    assert parallel.claim_gpu(tmp_path / ".gpus", 2)[1] == 0  # a lock goes with its holder


def test_slurm_preset_asks_for_the_trainers_gpus():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == launcher.tasks_per_node == 4 and launcher.nodes == 1  # one task per rank
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0 and "partition" in launcher


# --- Optuna ------------------------------------------------------------------------------------------------------


def test_optuna_preset_searches_lr_batch_size_weight_decay_and_epochs():
    cfg = compose_with_hydra(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc"
    assert set(sweeper.params) == {"optim.lr", "data.batch_size", "optim.weight_decay", "trainer.max_epochs"}


@pytest.mark.slow
def test_optuna_search_with_sqlite_storage_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}", *SMALL]
    for sweep in ("first", "second"):
        result = run_script("train.py", *command, f"hydra.sweep.dir={tmp_path / sweep}")
        assert result.returncode == 0, result.stderr[-3000:]
        values = [
            json.loads((tmp_path / sweep / r["job"] / "metrics.json").read_text())["val/acc"] for r in read_csv(tmp_path / sweep / "summary.csv")
        ]
        assert len(values) == 1
    study = optuna.load_study(study_name="vit", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2  # the second run added its trial to the first
    best = OmegaConf.load(tmp_path / "second" / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(t.value for t in study.trials))
    assert set(best.best_params) == {"optim.lr", "data.batch_size", "optim.weight_decay"}  # max_epochs fixed by SMALL


def test_objective_is_the_optimized_metric(make_cfg):
    metrics = {"val/acc": 0.5, "test/acc": 0.25, "test/loss": 1.5, "epochs": 3}
    assert cli.result_for_sweeper(lambda cfg: metrics, make_cfg()) == metrics
    assert cli.result_for_sweeper(lambda cfg: metrics, make_cfg(["optimized_metric=val/acc"])) == 0.5
    with pytest.raises(ConfigError, match="optimized_metric=val/ac is not a metric"):
        cli.result_for_sweeper(lambda cfg: pytest.fail("trained"), make_cfg(["optimized_metric=val/ac"]))
    with pytest.raises(ConfigError, match="val/acc needs data.val_size > 0"):
        cli.result_for_sweeper(lambda cfg: {**metrics, "val/acc": None}, make_cfg(["optimized_metric=val/acc"]))


@pytest.mark.parametrize("name", ["test/acc", "test/loss"])
def test_a_search_on_the_test_split_is_refused(make_cfg, name):
    """Choosing hyperparameters by a test figure would leave no unbiased test figure: refused before training, naming val/acc."""
    with pytest.raises(ConfigError) as info:
        cli.result_for_sweeper(lambda cfg: pytest.fail("trained"), make_cfg([f"optimized_metric={name}"]))
    assert str(info.value) == f"optimized_metric={name} would choose on the test split: use val/acc (with data.val_size > 0)"


def test_a_preset_without_its_plugin_is_one_line_naming_the_extra(monkeypatch, capsys):
    cli.require_plugins(["hparams_search=optuna", "hydra/launcher=slurm"])  # installed: nothing happens
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(SystemExit) as info:
        cli.require_plugins(["data=fake", "hydra/launcher=joblib"])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        'Error: hydra/launcher=joblib needs the Hydra plugin hydra-joblib-launcher: pip install -e ".[scale]"'
    ]
