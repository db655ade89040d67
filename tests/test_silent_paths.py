"""Paths that once did something other than what was asked: each test here failed before its fix."""

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import TINY, make_image_folder, wandb_records
from tests.faults import truncate
from tests.test_reliability import one_line_error
from vit import checkpoints, predict, report, run
from vit.callbacks import INTERRUPTED, TrainingDiverged
from vit.data import FakeDataModule, FolderDataModule


def sweep_of(trained_run: Path, sweep_dir: Path, jobs: int = 2) -> Path:
    """A sweep dir whose jobs are copies of one finished run, as ``train.py -m`` leaves them."""
    for job in range(jobs):
        job_dir = sweep_dir / str(job)
        shutil.copytree(trained_run, job_dir)
        (job_dir / ".hydra").mkdir(exist_ok=True)
        (job_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"trainer": {"max_epochs": 1}, "optim": {"lr": 0.001}}))
        best = next((job_dir / "checkpoints").glob("epoch*.ckpt"))
        (job_dir / "run.json").write_text(json.dumps({**json.loads((trained_run / "run.json").read_text()), "ckpt": str(best)}))
    return sweep_dir


def test_retesting_a_sweep_gives_every_logger_one_run_per_job(make_cfg, tmp_path, trained_run):
    mlflow = pytest.importorskip("mlflow")
    sweep = sweep_of(trained_run, tmp_path / "sweep")
    cfg = make_cfg([f"ckpt={sweep}", "logger=many"], name="test", run="retest")
    results = run.test(cfg)
    assert sorted(results) == ["0", "1"]
    client = mlflow.tracking.MlflowClient(cfg.logger.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("vit").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["test/acc"] == results["0"]["test/acc"] for r in runs)
    out = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["job0", "job1"]
    assert sorted(p.name for p in (out / "csv").iterdir()) == ["job0", "job1"]


def test_retesting_a_sweep_under_wandb_finishes_each_jobs_run(make_cfg, tmp_path, trained_run, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep = sweep_of(trained_run, tmp_path / "sweep")
    cfg = make_cfg([f"ckpt={sweep}", "logger=wandb"], name="test", run="retest")
    run.test(cfg)
    offline = sorted((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    for job, folder in zip(("job0", "job1"), offline):
        data = wandb_records(folder, b"test/acc")
        assert job.encode() in data and b"test/acc" in data


def test_a_failed_job_under_wandb_leaves_the_next_job_a_run_of_its_own(make_cfg, monkeypatch):
    """A sweep goes on after a failed job in the same process: the next job must not log into the failed one's run."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    poison = ["+callbacks.poison._target_=tests.faults.PoisonAtEpoch", "+callbacks.poison.epoch=0"]
    failed = make_cfg(["logger=wandb", "trainer.max_epochs=1", *poison], run="failed")
    with pytest.raises(TrainingDiverged):
        run.train(failed)
    following = make_cfg(["logger=wandb", "trainer.max_epochs=1", "trainer.limit_test_batches=1"], run="next")
    run.train(following)
    assert len(list((Path(following.paths.output_dir) / "wandb").glob("offline-run-*"))) == 1


def earlier_run(make_cfg, overrides: list[str]) -> Path:
    cfg = make_cfg(overrides, run="first")
    run.train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir


def test_ckpt_path_last_follows_the_run_dir_rule(make_cfg, caplog):
    """The newer of last.ckpt and interrupted.ckpt, and the same freedoms (more epochs, test, loggers) as a run dir."""
    first = earlier_run(make_cfg, ["trainer.max_epochs=1"])
    folder = first / "checkpoints"
    time.sleep(0.01)
    shutil.copy(folder / "last.ckpt", folder / INTERRUPTED)
    caplog.set_level(logging.INFO)
    metrics = run.train(make_cfg(["trainer.max_epochs=2", "test=false", "logger=csv", "ckpt_path=last"], run="second"))
    assert metrics["epochs"] == 2
    assert f"Resuming from {folder / INTERRUPTED}" in caplog.text


def test_resolve_finds_the_best_checkpoint_of_a_moved_run_dir(tmp_path, trained_run, caplog):
    was, moved = tmp_path / "was", tmp_path / "moved"
    shutil.copytree(trained_run, was)
    named = next((was / "checkpoints").glob("epoch*.ckpt")).name
    (was / "run.json").write_text(json.dumps({"ckpt": str(was / "checkpoints" / named)}))
    was.rename(moved)  # run.json still names the best checkpoint under was/
    shutil.copy(moved / "checkpoints" / named, moved / "checkpoints" / "epoch000-val_acc0.9999.ckpt")  # a higher score in the name
    assert checkpoints.resolve(moved) == moved / "checkpoints" / named

    (moved / "checkpoints" / named).unlink()
    caplog.set_level(logging.WARNING)
    assert checkpoints.resolve(moved) == moved / "checkpoints" / "epoch000-val_acc0.9999.ckpt"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert named in warning and "epoch000-val_acc0.9999.ckpt" in warning and "\n" not in warning


def with_tta_flip(trained_run: Path, path: Path) -> Path:
    checkpoint = torch.load(next((trained_run / "checkpoints").glob("epoch*.ckpt")), weights_only=True)
    checkpoint["hyper_parameters"]["config"]["module"]["tta_flip"] = True
    torch.save(checkpoint, path)
    return path


def test_predict_honours_tta_flip(make_cfg, tmp_path, trained_run):
    """With tta_flip an image and its mirror image get the same prediction; without, they do not."""
    images = tmp_path / "images"
    images.mkdir()
    torch.manual_seed(0)
    pixels = (torch.rand(32, 32, 3) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(images / "a.png")
    Image.fromarray(pixels.flip(1).numpy()).save(images / "b_mirrored.png")
    tta = with_tta_flip(trained_run, tmp_path / "tta.ckpt")
    plain = next((trained_run / "checkpoints").glob("epoch*.ckpt"))
    probabilities = {}
    for name, ckpt in (("tta", tta), ("plain", plain)):
        results = predict.predict(make_cfg([f"ckpt={ckpt}", f"image={images}", "top_k=10"], name="predict", tiny=False, run=f"predict_{name}"))
        probabilities[name] = [dict(r["top"]) for r in results]
    a, b = probabilities["plain"]
    assert any(abs(a[k] - b[k]) > 1e-4 for k in a)  # the net itself tells the mirror image apart
    a, b = probabilities["tta"]
    assert all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)


def test_an_evaluation_only_setting_does_not_block_a_resume(make_cfg, trained_run):
    metrics = run.train(make_cfg([f"ckpt_path={trained_run}", "data.eval_batch_size=32", "trainer.max_epochs=1", "trainer.limit_test_batches=1"]))
    assert metrics["epochs"] == 1


NOT_THE_MANUALS_VIT = [o for o in TINY if not o.startswith("model.")]


def test_train_sizes_train_a_cnn_which_takes_any_size(make_cfg):
    cnn = [
        *NOT_THE_MANUALS_VIT,
        "model=timm",
        "model.name=resnet10t",
        "data.train_sizes=[16,32]",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "test=false",
    ]
    assert run.train(make_cfg(cnn, tiny=False))["epochs"] == 2


def test_train_sizes_with_a_fixed_size_timm_vit_names_its_own_keys(make_cfg, capsys):
    timm_vit = [*NOT_THE_MANUALS_VIT, "model=timm", "model.img_size=32", "model.patch_size=4", "model.kwargs={depth:1}", "data.train_sizes=[16,32]"]
    cfg = make_cfg(timm_vit, tiny=False)
    line = one_line_error(run.train, cfg, capsys)
    assert "data.train_sizes" in line and "model.kwargs" in line and "model.dynamic_img_size" not in line


def test_images_per_s_counts_the_batch_preparation(make_cfg, monkeypatch):
    """``run.json``'s throughput covers what on_after_batch_transfer does (normalise, augment, resize)."""
    prepare = FakeDataModule.on_after_batch_transfer

    def slow(self, batch, dataloader_idx):
        if self.trainer.training:
            time.sleep(0.05)
        return prepare(self, batch, dataloader_idx)

    monkeypatch.setattr(FakeDataModule, "on_after_batch_transfer", slow)
    cfg = make_cfg(["trainer.max_epochs=1", "test=false"])
    run.train(cfg)
    stats = json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())
    batches = (256 - 64) // 32
    assert stats["train_time_s"] >= batches * 0.05 and stats["images_per_s"] <= 32 / 0.05


def test_a_damaged_decode_cache_is_decoded_again(tmp_path, caplog):
    root = make_image_folder(tmp_path / "images")
    folder = dict(root=str(root), data_dir=str(tmp_path / "data"), val_size=2)
    first = FolderDataModule(**folder)
    first.setup("fit")
    (cache,) = list((tmp_path / "data" / "cache").glob("train-*.pt"))
    truncate(cache)
    caplog.set_level(logging.WARNING)
    again = FolderDataModule(**folder)
    again.setup("fit")
    assert torch.equal(again.train_set.images, first.train_set.images)
    assert str(cache) in caplog.text
    assert torch.load(cache, weights_only=True)["images"].shape[0] == 8  # rebuilt whole: 2 classes x 4 images


@pytest.mark.parametrize("name", ["run.json", "metrics.json", "job.json", ".hydra/config.yaml"])
def test_a_damaged_job_file_is_one_warning_naming_it_in_the_sweep_report(tmp_path, trained_run, caplog, name):
    sweep = sweep_of(trained_run, tmp_path / "sweep")
    (sweep / "0" / "job.json").write_text(json.dumps({"status": "ok"}))
    if name.endswith(".yaml"):
        (sweep / "0" / name).write_bytes(b"trainer: [1, \x00\xff")  # truncated block YAML still parses: bytes that do not
    else:
        truncate(sweep / "0" / name, keep=3)
    caplog.set_level(logging.WARNING)
    rows, _ = report.collect(sweep)
    assert sorted(r["job"] for r in rows) == ["0", "1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(sweep / "0" / name) in warnings[0]


def test_a_damaged_run_json_is_named_when_testing_a_run_dir(tmp_path, trained_run, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    truncate(run_dir / "run.json", keep=3)
    caplog.set_level(logging.WARNING)
    assert checkpoints.resolve(run_dir) == next((run_dir / "checkpoints").glob("epoch*.ckpt"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(run_dir / "run.json") in warning


def test_a_truncated_resume_checkpoint_is_one_line(make_cfg, tmp_path, trained_run, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    truncate(run_dir / "checkpoints" / "last.ckpt")
    line = one_line_error(run.train, make_cfg([f"ckpt_path={run_dir}"]), capsys)
    assert str(run_dir / "checkpoints" / "last.ckpt") in line and "truncated or corrupt" in line
