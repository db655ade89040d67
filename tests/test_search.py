"""A search spends no trial on runs that cannot give it its metric: each precondition of ``optimized_metric`` stops a run
before it trains, and a grid or an Optuna search before its first trial, in one line naming the fix."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tests.conftest import CONF, TINY, run_script
from vit import cli
from vit.errors import ConfigError

VAL = "optimized_metric=val/acc"


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.val_size=0"], "data.val_size=0: set data.val_size > 0"),
        (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0: leave it at 1.0"),
        (["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=3"], "trainer.check_val_every_n_epoch=3 validates none of trainer.max_epochs=2"),
        (["+trainer.fast_dev_run=true"], "trainer.fast_dev_run keeps no best checkpoint"),
        (["+trainer.enable_checkpointing=false"], "trainer.enable_checkpointing=false keeps no best checkpoint"),
        (["~callbacks.model_checkpoint"], "no callback keeps the best val/acc"),
        (
            ["callbacks.model_checkpoint.monitor=val/loss"],
            "callbacks.model_checkpoint.monitor=val/loss records another metric's best: set it to val/acc",
        ),
        (["callbacks.model_checkpoint.mode=min"], "callbacks.model_checkpoint.mode=min records the lowest val/acc: set it to max"),
    ],
)
def test_a_run_that_cannot_produce_its_metric_stops_before_training(make_cfg, overrides, named):
    with pytest.raises(ConfigError) as info:
        cli.result_for_sweeper(lambda cfg: pytest.fail("trained"), make_cfg([VAL, *overrides]))
    assert str(info.value).startswith("optimized_metric=val/acc") and named in str(info.value) and "\n" not in str(info.value)


def sweep_config(overrides: list[str], swept: list[str] = (), params: dict | None = None, base: list[str] = TINY):
    """The config a ``python train.py -m`` sweep's callbacks get: ``swept`` are the grid's list overrides, ``params``
    an Optuna search's added search space."""
    base = [o for o in base if o.split("=")[0] not in (params or {})]  # a key searched is not also fixed
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(CONF), version_base="1.3")
    config = compose("train", overrides=[*base, *overrides], return_hydra_config=True)
    with open_dict(config):
        config.hydra.overrides.task = [*base, *overrides, *swept]
        config.hydra.sweeper.params = {**(config.hydra.sweeper.get("params") or {}), **(params or {})}
    return config


def stops_before_the_first_trial(config, capsys) -> str:
    from vit.search import SearchCheck

    with pytest.raises(SystemExit) as info:
        SearchCheck().on_multirun_start(config=config)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1 and err[0].startswith("Error: ") and err[0].endswith("no trial was run"), err
    return err[0]


@pytest.mark.parametrize(
    "overrides, swept, params, named",
    [
        ([VAL], ["data.val_size=64,0"], None, "data.val_size=0: set data.val_size > 0 (e.g. 5000) (job 1 (data.val_size=0))"),
        (["hparams_search=optuna"], [], {"data.val_size": "choice(64, 0)"}, "(a trial with data.val_size=0)"),
        ([VAL], [], {"data.val_size": "64,0"}, "(job 1 (data.val_size=0))"),  # a grid's hydra.sweeper.params
        (["hparams_search=optuna", "trainer.limit_val_batches=0"], [], None, "trainer.limit_val_batches=0"),
        (["hparams_search=optuna", "optimized_metric=null"], [], None, "an Optuna search needs optimized_metric=val/acc"),
        (
            ["hparams_search=optuna", "hydra.sweeper.direction=minimize"],
            [],
            None,
            "hydra.sweeper.direction=minimize would look for the lowest val/acc",
        ),
        (["optimized_metric=val/ac"], ["optim.lr=1e-3,1e-4"], None, "optimized_metric=val/ac is not a metric of a run"),
    ],
)
def test_a_search_whose_runs_cannot_produce_its_metric_stops_before_the_first_trial(capsys, overrides, swept, params, named):
    try:
        assert named in stops_before_the_first_trial(sweep_config(overrides, swept, params), capsys)
    finally:
        GlobalHydra.instance().clear()


def test_a_preset_of_the_grid_without_validation_stops_it(capsys):
    """``experiment=fast`` trains on all 50,000 images (data.val_size=0): no job of it could return val/acc."""
    try:
        assert "(job 1 (experiment=fast))" in stops_before_the_first_trial(sweep_config([VAL], ["experiment=small_strong,fast"], base=[]), capsys)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    "overrides, swept", [(["hparams_search=optuna"], []), ([VAL], ["data.val_size=64,32", "trainer.max_epochs=1,2"]), ([], ["data.val_size=0,64"])]
)
def test_a_search_that_can_produce_its_metric_starts(overrides, swept):
    """The Optuna preset and a grid with validation in every job start; a grid without optimized_metric is not checked."""
    from vit.search import SearchCheck

    try:
        SearchCheck().on_multirun_start(config=sweep_config(overrides, swept))
    finally:
        GlobalHydra.instance().clear()


def test_train_py_sweep_stops_before_any_job_dir(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_script("train.py", "-m", *TINY, VAL, "data.val_size=0,64", f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={tmp_path / 'data'}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("Error: optimized_metric=val/acc needs a validation split")
    assert not sweep_dir.exists()
