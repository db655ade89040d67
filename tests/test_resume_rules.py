"""Resuming with other settings, group by group (trainer, callbacks, data, module, model, optim, scheduler): each change
is refused in one line naming the checkpoint's value, or let through with a line in the log that is also recorded in
every later checkpoint and run.json; a key a config leaves out is compared at the default stored with the checkpoint."""

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.faults import kill_at
from tests.test_reliability import one_line_error
from vit import checkpoints, run
from vit.errors import ConfigError

CLASSES = [f"class{i}" for i in range(10)]


def checkpoint_of(make_cfg, tmp_path, overrides=(), edit=None) -> Path:
    """A checkpoint file holding the stored config of a run of ``overrides`` (``edit`` changes it first): what
    ``resume_from`` reads of a checkpoint, without training one."""
    stored = checkpoints.stored_config(make_cfg(list(overrides), run="trained"), CLASSES)
    if edit:
        edit(stored)
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": {}, "epoch": 3, "hyper_parameters": {"config": stored}}, path)
    return path


def resume(make_cfg, path: Path, overrides=()) -> dict:
    """This run's stored config after ``resume_from`` let it resume from ``path`` with ``overrides``."""
    cfg = make_cfg([*overrides, f"ckpt_path={path}"], run="resumed")
    stored = checkpoints.stored_config(cfg, CLASSES)
    assert checkpoints.resume_from(cfg, stored) == str(path)
    return stored


def refused(make_cfg, path: Path, overrides=()) -> str:
    cfg = make_cfg([*overrides, f"ckpt_path={path}"], run="resumed")
    with pytest.raises(ConfigError) as info:
        checkpoints.resume_from(cfg, checkpoints.stored_config(cfg, CLASSES))
    assert "\n" not in str(info.value) and "resume with the settings it was trained with" in str(info.value)
    return str(info.value)


def logged(make_cfg, path: Path, caplog, overrides=()) -> list[str]:
    """The changes a resume let through: each in the log, and in the record every later checkpoint stores."""
    with caplog.at_level(logging.INFO, logger="vit.checkpoints"):
        stored = resume(make_cfg, path, overrides)
    changed = stored["resumed"][-1]["changed"]
    assert stored["resumed"][-1]["from"] == str(path) and stored["resumed"][-1]["epoch"] == 3
    assert all(f"Resuming with {line}" in caplog.text for line in changed)
    return changed


@pytest.mark.parametrize(
    "trained, now, named",
    [
        ([], ["trainer.limit_val_batches=0.5"], "trainer.limit_val_batches=1.0"),  # val/acc picks the best across the resume
        ([], ["+trainer.overfit_batches=2"], "trainer.overfit_batches=0.0 (unset there: its default)"),
        ([], ["trainer.use_distributed_sampler=true"], "trainer.use_distributed_sampler=False"),
        ([], ["trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=None"),
    ],
)
def test_trainer_settings_that_change_what_trains_are_refused(make_cfg, tmp_path, trained, now, named):
    assert named in refused(make_cfg, checkpoint_of(make_cfg, tmp_path, trained), now)


@pytest.mark.parametrize(
    "now, line",
    [
        ("trainer.max_epochs=30", "trainer.max_epochs: 20 -> 30: training goes on to the new epoch count"),
        ("trainer.precision=64-true", "trainer.precision: "),
        ("trainer.devices=2", "trainer.devices: 1 -> 2: the effective batch size"),
        ("trainer.check_val_every_n_epoch=2", "trainer.check_val_every_n_epoch: 1 -> 2"),
        ("trainer.limit_test_batches=0.5", "trainer.limit_test_batches: 1.0 -> 0.5: this run's test reads"),
    ],
)
def test_trainer_settings_let_through_are_logged_and_recorded(make_cfg, tmp_path, caplog, now, line):
    changed = logged(make_cfg, checkpoint_of(make_cfg, tmp_path), caplog, [now, "trainer.enable_progress_bar=true"])
    assert len(changed) == 1 and changed[0].startswith(line) and now.partition("=")[2] in changed[0], changed  # what is shown is free


@pytest.mark.parametrize(
    "trained, now, named",
    [
        ([], ["callbacks=ema"], "callbacks.ema=<none>"),  # the average is what is validated and tested
        (["callbacks=ema"], [], "callbacks.ema=vit.callbacks.WeightEMA"),
        (["callbacks=ema"], ["callbacks=ema", "callbacks.ema.decay=0.99"], "callbacks.ema.decay=0.999"),
        ([], ["callbacks.model_checkpoint.monitor=val/loss"], "callbacks.model_checkpoint.monitor=val/acc"),
        ([], ["~callbacks.model_checkpoint"], "callbacks.model_checkpoint=vit.callbacks.RunCheckpoint"),
        (
            [],
            ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging", "+callbacks.swa.swa_lrs=0.01"],
            "callbacks.swa=<none>",
        ),
    ],
)
def test_callbacks_that_change_what_trains_or_is_tested_are_refused(make_cfg, tmp_path, trained, now, named):
    assert named in refused(make_cfg, checkpoint_of(make_cfg, tmp_path, trained), now)


def test_callbacks_let_through_are_logged_and_recorded(make_cfg, tmp_path, caplog):
    path = checkpoint_of(make_cfg, tmp_path, kill_at(5))
    changed = logged(make_cfg, path, caplog, ["~callbacks.rng_state", "callbacks.model_checkpoint.save_top_k=2"])
    assert [c.split(":")[0] for c in changed] == ["callbacks.rng_state", "callbacks.stop"], changed  # save_top_k is free
    assert "callbacks.stop: tests.faults.KillAtStep -> <none>: a callback whose effect" in changed[1]


def stored_default(section: str, key: str, value):
    """An edit: the checkpoint's run had ``key`` at another default than today's code has (an option added since)."""

    def edit(stored: dict) -> None:
        stored.setdefault("defaults", {}).setdefault(section, {})[key] = value

    return edit


@pytest.mark.parametrize(
    "left_out, section, key, then, named",
    [
        ("~model.pool", "model", "pool", "cls", "model.pool='cls' (unset there: its default)"),
        ("~data.crop_padding", "data", "crop_padding", 2, "data.crop_padding=2 (unset there: its default)"),
        ("~module.label_smoothing", "module", "label_smoothing", 0.1, "module.label_smoothing=0.1 (unset there: its default)"),
        ("~optim.weight_decay", "optim", "weight_decay", 0.01, "optim.weight_decay=0.01 (unset there: its default)"),
        ("~scheduler.min_lr_ratio", "scheduler", "min_lr_ratio", 0.1, "scheduler.min_lr_ratio=0.1 (unset there: its default)"),
        ("~trainer.accumulate_grad_batches", "trainer", "accumulate_grad_batches", 2, "trainer.accumulate_grad_batches=2 (unset there: its default)"),
    ],
)
def test_a_key_left_out_is_compared_at_the_default_stored_with_the_checkpoint(make_cfg, tmp_path, left_out, section, key, then, named):
    """Both configs leave the key out; the checkpoint's run trained at the default of its day, not today's."""
    overrides = ["scheduler=cosine", left_out]
    path = checkpoint_of(make_cfg, tmp_path, overrides, edit=stored_default(section, key, then))
    assert named in refused(make_cfg, path, overrides)
    path = checkpoint_of(make_cfg, tmp_path, overrides)
    resume(make_cfg, path, overrides)  # at the same default: resumes


@pytest.mark.parametrize(
    "trained, now, line",
    [
        (["data.val_size=0"], ["data.val_size=0", "module.tta_flip=true"], "module.tta_flip: False -> True"),
        (["model.compile=false"], ["model.compile=true"], "model.compile: False -> True"),
        ([], ["model.fused=false"], "model.fused: None -> False"),
        ([], ["data.data_dir=elsewhere"], "data.data_dir: "),
    ],
)
def test_data_module_and_model_settings_let_through_are_logged_and_recorded(make_cfg, tmp_path, caplog, trained, now, line):
    changed = logged(make_cfg, checkpoint_of(make_cfg, tmp_path, trained), caplog, now)
    assert len(changed) == 1 and changed[0].startswith(line), changed


def test_a_checkpoint_from_before_the_whole_config_was_stored_resumes_as_before(make_cfg, tmp_path, caplog):
    """No ``defaults``, no callbacks, four trainer keys: only what was compared then is compared."""

    def old_format(stored: dict) -> None:
        stored.pop("defaults", None), stored.pop("callbacks", None)
        stored["trainer"] = {k: stored["trainer"][k] for k in ("max_epochs", "accumulate_grad_batches", "gradient_clip_val", "limit_train_batches")}

    path = checkpoint_of(make_cfg, tmp_path, edit=old_format)
    assert logged(make_cfg, path, caplog, ["callbacks=ema", "trainer.precision=32-true"]) == []
    assert "model.emb_size=16" in refused(make_cfg, path, ["model.emb_size=32"])


def test_a_resumed_run_records_what_changed_in_its_checkpoints_and_run_json(make_cfg, capsys, trained_run):
    cfg = make_cfg([f"ckpt_path={trained_run}", "trainer.max_epochs=2"], run="longer")
    run.train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "run.json").read_text())["resumed"]
    assert record == checkpoints.load(out / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]["resumed"]
    assert record[0]["epoch"] == 0 and any(c.startswith("trainer.max_epochs: 1 -> 2") for c in record[0]["changed"])
    refused_line = one_line_error(run.train, make_cfg([f"ckpt_path={out}", "trainer.max_epochs=3", "callbacks=ema"], run="again"), capsys)
    assert "callbacks.ema=<none>" in refused_line


def test_a_checkpoint_stores_its_targets_defaults(make_cfg):
    """What a later resume compares a key left out of the config with: the constructor's defaults of the day, here read
    from the signatures themselves."""
    import inspect

    from vit.model import ViT
    from vit.module import ClassifierModule

    stored = checkpoints.stored_config(make_cfg([]), CLASSES)
    for key, cls in (("model", ViT), ("module", ClassifierModule)):
        plain = {n: p.default for n, p in inspect.signature(cls).parameters.items() if isinstance(p.default, (bool, int, float, str))}
        assert len(plain) >= 5 and {n: stored["defaults"][key][n] for n in plain} == plain
