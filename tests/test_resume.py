"""Every path back into a run gives what the uninterrupted run would: resume from either file, a run dir, changed settings;
test.py and predict on a resumed run dir or other data; checkpoint writes that cannot lose the last good file."""

import errno
import json
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import TINY, compose_config, make_image_folder, run_script
from tests.faults import kill_at
from tests.test_reliability import RESUMABLE, one_line_error
from vit import callbacks, checkpoints, run
from vit.data import FakeDataModule


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text())["history"]


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_resume_from_interrupted_ckpt_ends_as_uninterrupted(make_cfg, tmp_path):
    """SIGINT after batch 5 of epoch 1, resume from interrupted.ckpt: the same metrics, curve and weights as a run never stopped."""
    overrides = [*RESUMABLE, "trainer.max_epochs=2"]
    full = make_cfg(overrides[len(TINY) :], run="full")
    uninterrupted = run.train(full)
    steps_per_epoch = (512 - 64) // 32
    resumed = interrupted_then_resumed(make_cfg, tmp_path, overrides, kill_at(steps_per_epoch + 5, "SIGINT"))
    assert run.train(resumed) == uninterrupted
    assert history(Path(resumed.paths.output_dir)) == history(Path(full.paths.output_dir))  # train/acc of epoch 1 included
    assert same_last_weights(full, resumed)


def interrupted_then_resumed(make_cfg, tmp_path: Path, overrides: list[str], kill: list[str]):
    """Runs ``python train.py`` with ``overrides`` until ``kill`` (``tests.faults.kill_at``) stops it; the config of a
    run resumed from its interrupted.ckpt."""
    stopped = tmp_path / "stopped"
    result = run_script("train.py", *overrides, *kill, f"hydra.run.dir={stopped}", f"paths.data_dir={tmp_path / 'data'}")
    interrupted = stopped / "checkpoints" / callbacks.INTERRUPTED
    assert result.returncode != 0 and interrupted.exists(), result.stderr[-2000:]
    return make_cfg([*overrides[len(TINY) :], f"ckpt_path={interrupted}"], run="resumed")


def same_last_weights(*cfgs) -> bool:
    weights = [torch.load(Path(c.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for c in cfgs]
    return all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


@pytest.mark.slow
@pytest.mark.parametrize("after_batch", [False, True], ids=["inside-a-step", "between-batches"])
def test_ctrl_c_during_validation_then_resume_ends_as_uninterrupted(make_cfg, tmp_path, after_batch):
    """SIGINT in batch 2 of epoch 0's validation (5 batches, the last short): the resumed run validates that epoch over
    the whole split and keeps its training metrics, so its curve, best checkpoint and test are the uninterrupted's."""
    overrides = [*RESUMABLE, "trainer.max_epochs=2", "data.val_size=72", "data.eval_batch_size=16"]
    full = make_cfg(overrides[len(TINY) :], run="full")
    uninterrupted = run.train(full)
    steps_per_epoch = torch.load(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] // 2
    kill = kill_at(steps_per_epoch, "SIGINT", validation_batch=2, after_batch=after_batch)
    resumed = interrupted_then_resumed(make_cfg, tmp_path, overrides, kill)
    assert run.train(resumed) == uninterrupted
    assert history(Path(resumed.paths.output_dir)) == history(Path(full.paths.output_dir))
    assert same_last_weights(full, resumed)  # model.drop_p=0.1: the dropout draws after the validation are the same


def test_resuming_a_run_dir_takes_its_newest_resume_point_not_its_best(make_cfg, tmp_path, trained_run):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    folder = run_dir / "checkpoints"
    best = next(folder.glob("epoch*.ckpt"))
    best.rename(folder / "epoch000-val_acc0.9999.ckpt")  # the best file, older than last.ckpt's epoch
    saved = checkpoints.load(folder / "last.ckpt")["hyper_parameters"]["config"]
    assert checkpoints.resume_from(make_cfg([f"ckpt_path={run_dir}"]), saved) == str(folder / "last.ckpt")
    shutil.copy(folder / "last.ckpt", folder / callbacks.INTERRUPTED)  # Ctrl-C after the last epoch end: the newer file
    assert checkpoints.resume_point(run_dir) == folder / callbacks.INTERRUPTED
    (folder / "last.ckpt").unlink()
    (folder / callbacks.INTERRUPTED).unlink()
    with pytest.raises(run.ConfigError, match="no last.ckpt or interrupted.ckpt"):
        checkpoints.resume_point(run_dir)


def test_a_run_resumed_from_last_ckpt_has_every_epoch_in_its_history(make_cfg):
    """Validating every 2nd epoch, Lightning wrote last.ckpt at validation end, before RunStats recorded the epoch."""
    every_2nd = ["trainer.check_val_every_n_epoch=2"]
    full = make_cfg([*every_2nd, "trainer.max_epochs=3"], run="full")
    run.train(full)
    first = make_cfg([*every_2nd, "trainer.max_epochs=2"], run="first")
    run.train(first)
    resumed = make_cfg([*every_2nd, "trainer.max_epochs=3", f"ckpt_path={first.paths.output_dir}"], run="resumed")
    run.train(resumed)
    assert history(Path(resumed.paths.output_dir)) == history(Path(full.paths.output_dir))


def test_last_ckpt_is_the_last_epoch_also_when_val_acc_did_not_improve(make_cfg):
    cfg = make_cfg(["trainer.max_epochs=2", "optim.lr=1e-12"])  # the weights hardly move: the same val/acc, no new best
    run.train(cfg)
    assert torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cosine") / "run"
    run.train(compose_config("train", [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "scheduler=cosine"], out))
    GlobalHydra.instance().clear()
    return out


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["optim.lr=1e-4"], "optim.lr=0.001"),
        (["data.batch_size=64"], "data.batch_size=32"),
        (["module.label_smoothing=0.1"], "module.label_smoothing=0.0"),
        (["trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=1"),
    ],
)
def test_resuming_with_other_settings_is_one_line_naming_them(make_cfg, capsys, trained_run, overrides, named):
    cfg = make_cfg([f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", *overrides])
    line = one_line_error(run.train, cfg, capsys)
    assert named in line and "was trained with" in line


def test_more_epochs_resume_without_a_schedule_but_not_with_one(make_cfg, capsys, trained_run, cosine_run):
    cfg = make_cfg(
        [f"ckpt_path={cosine_run / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2", "trainer.limit_train_batches=2", "scheduler=cosine"],
        run="cosine2",
    )
    assert "trainer.max_epochs=1" in one_line_error(run.train, cfg, capsys)
    # Without a schedule: more epochs, written elsewhere and shown otherwise, is the legitimate case.
    cfg = make_cfg(
        [
            f"ckpt_path={trained_run}",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=true",
            "trainer.limit_test_batches=1",
            "trainer.log_every_n_steps=3",
        ],
        run="longer",
    )
    assert run.train(cfg)["epochs"] == 2


def test_max_epochs_minus_one_with_a_schedule_is_one_line(make_cfg, capsys):
    assert "trainer.max_epochs=-1" in one_line_error(run.train, make_cfg(["scheduler=cosine", "trainer.max_epochs=-1"]), capsys)


def test_cuda_rng_states_of_more_gpus_than_visible_restore_what_fits(monkeypatch):
    restored = []

    def set_rng_state(state, device=0):
        if device >= 1:
            raise IndexError("list index out of range")  # what torch does for a GPU that is not there
        restored.append((int(state[0]), device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    state = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([7], dtype=torch.uint8), torch.tensor([9], dtype=torch.uint8)]}
    callbacks.RngState().load_state_dict(state)
    assert restored == [(7, 0)]


def test_a_resumed_run_dir_tests_the_checkpoint_its_run_json_names(tmp_path, trained_run):
    """A run resumed from another dir may have its best epoch there: test.py, predict and run.json agree on it."""
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_run, resumed)
    best = next((trained_run / "checkpoints").glob("epoch*.ckpt"))
    for f in (resumed / "checkpoints").glob("epoch*.ckpt"):
        f.unlink()
    (resumed / "run.json").write_text(json.dumps({**json.loads((trained_run / "run.json").read_text()), "ckpt": str(best)}))
    assert checkpoints.resolve(resumed) == best


def test_testing_on_other_data_keeps_the_checkpoints_preprocessing(make_cfg, trained_run):
    data = ["data=fake", "data.test_size=64", "data.eval_batch_size=64"]
    own = run.test(make_cfg([f"ckpt={trained_run}", *data], name="test", run="own"))
    other = run.test(
        make_cfg([f"ckpt={trained_run}", *data, "data.mean=[0.1,0.2,0.3]", "data.std=[0.9,0.9,0.9]", "data.image_size=16"], name="test", run="other")
    )
    assert own["test/acc"] == json.loads((trained_run / "metrics.json").read_text())["test/acc"]
    assert other["test/acc"] == own["test/acc"] and other["test/loss"] == pytest.approx(own["test/loss"], abs=1e-6)


def test_testing_on_data_with_other_class_names_is_one_line(make_cfg, capsys, tmp_path, trained_run):
    root = make_image_folder(tmp_path / "images", classes=tuple(f"kind{i}" for i in range(10)), per_class=1)
    cfg = make_cfg([f"ckpt={trained_run}", "data=folder", f"data.root={root}", f"data.data_dir={tmp_path / 'cache'}"], name="test")
    line = one_line_error(run.test, cfg, capsys)
    assert "class0" in line and "kind0" in line


def test_test_labels_follow_the_checkpoints_class_order():
    dm = FakeDataModule(num_classes=3, train_size=8, test_size=6, val_size=0)
    dm.setup("test")
    labels = dm.test_set.labels.clone()
    dm.use_classes(["class2", "class0", "class1"])
    assert list(dm.classes) == ["class2", "class0", "class1"]
    assert [dm.classes[i] for i in dm.test_set.labels] == [f"class{int(i)}" for i in labels]


def test_a_checkpoint_write_that_dies_half_way_never_leaves_a_truncated_file(make_cfg, tmp_path, monkeypatch):
    """The file at the checkpoint's path is always a whole checkpoint, the old one or the new one.

    Two ways a write dies: the temp dir on another filesystem than the run dir (a cluster node's /tmp, so a
    write through it ends in a copy to the target) and the disk filling during that copy; and the file size
    limit reached while the new file is written.
    """
    trainer = run.build_trainer(make_cfg(), callbacks=[])
    io = trainer.strategy.checkpoint_io
    folder = tmp_path / "checkpoints"
    path = folder / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)
    good = path.read_bytes()

    rename = os.rename

    def rename_on_one_filesystem(src, dst, *args, **kwargs):
        if Path(src).resolve().parent != Path(dst).resolve().parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst, *args, **kwargs)

    def copy_until_the_disk_is_full(src, dst, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", rename_on_one_filesystem)
        patch.setattr(shutil, "copyfile", copy_until_the_disk_is_full)
        try:
            io.save_checkpoint({"step": 2, "w": torch.zeros(10)}, path)
        except OSError:
            pass
    assert torch.load(path, weights_only=True)["step"] in (1, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no temporary file left behind

    io.save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) + 4096, hard))
    try:
        with pytest.raises((OSError, RuntimeError)):  # torch.save reports a failed write as either
            io.save_checkpoint({"step": 3, "w": torch.zeros(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == good and sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


VIT = "vit.model.ViT"
MUON = {"_target_": "vit.optim.MuonAdamW", "_partial_": True, "lr": 1e-3}


def test_an_option_added_since_the_checkpoint_at_its_default_does_not_block_resume():
    from vit.checkpoints import settings_that_differ

    trained = {"model": {"_target_": VIT, "emb_size": 64, "stem_channels": []}, "optim": MUON}  # written before model.stem_strides existed
    now = {"model": {**trained["model"], "stem_strides": []}, "optim": MUON}
    assert settings_that_differ(trained, now) == []
    now["model"]["stem_strides"] = [1]
    assert settings_that_differ(trained, now) == ["model.stem_strides=[] (unset there: its default)"]
    assert settings_that_differ(trained, {"model": {**trained["model"], "emb_size": 128}, "optim": MUON}) == ["model.emb_size=64"]


def test_a_key_added_on_resume_is_a_setting_like_any_other():
    """``+optim.nesterov=false`` on a resume of a run that trained with Muon's default (Nesterov on) differs, though
    false is an "off" value: the restored optimizer would go on with Nesterov while the run records false."""
    from vit.checkpoints import settings_that_differ

    trained = {"optim": MUON}
    assert settings_that_differ(trained, {"optim": {**MUON, "nesterov": False}}) == ["optim.nesterov=True (unset there: its default)"]
    assert settings_that_differ(trained, {"optim": {**MUON, "nesterov": True}}) == []  # what it trained with, now written down
    assert settings_that_differ({"optim": {"lr": 1e-3}}, {"optim": {"lr": 1e-3, "nesterov": False}}) == ["optim.nesterov=<unset>"]  # no _target_


def test_resume_refuses_a_key_added_at_another_value_than_its_default(make_cfg, trained_run):
    """Adam's eps defaults to 1e-8: ``+optim.eps=0`` would train on with 1e-8 (restored param groups) while recording 0."""
    with pytest.raises(checkpoints.ConfigError, match=r"optim\.eps=1e-08 \(unset there: its default\)"):
        run.train(make_cfg([f"ckpt_path={trained_run}", "+optim.eps=0", "trainer.max_epochs=2"]))


def test_test_views_may_not_change_on_resume_with_a_validation_split(make_cfg, trained_run):
    """With a validation split, tta_flip makes val/acc, which chooses the best checkpoint across the resume."""
    with pytest.raises(checkpoints.ConfigError, match=r"module\.tta_flip=False"):
        run.train(make_cfg([f"ckpt_path={trained_run}", "module.tta_flip=true", "trainer.max_epochs=2"]))


def test_test_views_may_change_on_resume_without_validation_and_test_py_reproduces_the_run(make_cfg):
    first = make_cfg(["data.val_size=0", "trainer.max_epochs=1", "trainer.limit_test_batches=1"], run="no_val")
    run.train(first)
    GlobalHydra.instance().clear()
    resumed_cfg = make_cfg(
        ["data.val_size=0", f"ckpt_path={first.paths.output_dir}", "module.tta_flip=true", "trainer.max_epochs=2", "trainer.limit_test_batches=1"],
        run="no_val_resumed",
    )
    resumed = run.train(resumed_cfg)
    GlobalHydra.instance().clear()
    again = run.test(make_cfg([f"ckpt={resumed_cfg.paths.output_dir}", "trainer.limit_test_batches=1"], name="test", tiny=False, run="retest"))
    assert resumed["epochs"] == 2 and again["test/acc"] == pytest.approx(resumed["test/acc"], abs=1e-6)
    assert checkpoints.load(checkpoints.resolve(resumed_cfg.paths.output_dir))["hyper_parameters"]["config"]["module"]["tta_flip"] is True
