"""Assignment step 5: the sweep report, TensorBoard's HPARAMS and test images, test.py on a sweep, predict."""

import csv
import json
import shutil
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import TINY, run_script
from vit import predict, report
from vit.builders import evaluation_module
from vit.model import ViT

SWEEP_SMALL = [o for o in TINY if not o.startswith(("trainer.max_epochs", "~callbacks.test_figures"))] + [
    "data.train_size=128",
    "data.val_size=32",
    "data.test_size=32",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


@pytest.fixture(scope="module")
def design_card_sweep(tmp_path_factory) -> Path:
    """The design-card sweep, shrunk: 2 x 2 x 2 jobs on fake data."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_script("train.py", "-m", "trainer.max_epochs=2,3", "data.batch_size=32,64", "optim.lr=1e-3,1e-4", *SWEEP_SMALL, cwd=cwd, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = list((cwd / "outputs" / "multirun").glob("*/*"))  # the default sweep dir
    assert f"Sweep report: {sweep.relative_to(cwd) / 'summary.md'}" in result.stdout
    return sweep


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_makes_eight_job_dirs(design_card_sweep):
    jobs = report.job_dirs(design_card_sweep)
    assert [j.name for j in jobs] == [str(i) for i in range(8)]
    for job in jobs:
        assert (job / "metrics.json").exists() and (job / "checkpoints" / "last.ckpt").exists()
        assert list(job.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_report_has_a_row_per_job_with_its_metrics(design_card_sweep):
    rows = read_csv(design_card_sweep / "summary.csv")
    assert list(rows[0]) == report.COLUMNS  # nothing else varies in this sweep
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {(r["max_epochs"], r["batch_size"], r["lr"]) for r in rows} == {
        (e, b, lr) for e in ("2", "3") for b in ("32", "64") for lr in ("0.001", "0.0001")
    }
    for row in rows:
        metrics = json.loads((design_card_sweep / row["job"] / "metrics.json").read_text())
        assert float(row["val_acc"]) == pytest.approx(metrics["val/acc"])
        assert float(row["test_acc"]) == pytest.approx(metrics["test/acc"])
        assert float(row["test_loss"]) == pytest.approx(metrics["test/loss"])
        assert int(row["epochs"]) == metrics["epochs"] == int(row["max_epochs"])
        assert float(row["train_time_s"]) > 0 and float(row["images_per_s"]) > 0 and int(row["params"]) > 0
        history = json.loads((design_card_sweep / row["job"] / "run.json").read_text())["history"]
        assert [h["epoch"] for h in history] == list(range(int(row["max_epochs"])))  # every epoch, whichever was best
        assert Path(row["ckpt"]).exists()
    val = [float(r["val_acc"]) for r in rows]
    assert val == sorted(val, reverse=True)
    md = (design_card_sweep / "summary.md").read_text()
    assert f"**{rows[0]['job']} (best)**" in md and md.count("\n| ") == 9
    assert Image.open(design_card_sweep / "summary.png").size[0] > 800


@pytest.mark.slow
def test_event_files_carry_hparams_and_test_images(design_card_sweep):
    job = design_card_sweep / "0"
    metrics = json.loads((job / "metrics.json").read_text())
    events = EventAccumulator(str(job / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"test/confusion_matrix", "test/predictions"} <= set(events.Tags()["images"])
    hparams = {}
    for raw in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            hparams = dict(data.session_start_info.hparams)
        if data.HasField("experiment"):
            assert {m.name.tag for m in data.experiment.metric_infos} == set(HPARAMS_METRICS)
    assert hparams["max_epochs"].number_value == 2 and hparams["lr"].number_value == pytest.approx(1e-3)
    assert hparams["optimizer"].string_value == "Adam" and hparams["params"].number_value > 0
    assert events.Scalars("test/acc")[-1].value == pytest.approx(metrics["test/acc"])
    for tag, key in HPARAMS_METRICS.items():  # HPARAMS shows the run's real metrics
        assert [e.value for e in events.Scalars(tag)] == [pytest.approx(metrics[key])]
    assert "hp_metric" not in events.Tags()["scalars"]


HPARAMS_METRICS = {"hparams/best_val_acc": "val/acc", "hparams/test_acc": "test/acc", "hparams/test_loss": "test/loss"}


@pytest.mark.slow
def test_tensorboard_keeps_every_point_of_every_curve(design_card_sweep):
    """Read as TensorBoard reads it (its loader, default settings): a step going back would drop the points after it."""
    (job,) = [
        j
        for j in report.job_dirs(design_card_sweep)
        if report.job_row(j)["max_epochs"] == 3 and report.job_row(j)["lr"] == 1e-3 and report.job_row(j)["batch_size"] == 32
    ]
    events = EventAccumulator(str(job / "tensorboard"))
    events.Reload()
    for tag in ("val/acc", "val/loss", "train/acc", "train/loss_epoch"):
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == 3 and steps == sorted(set(steps)) and steps[0] > 0, (tag, steps)
    metrics = json.loads((job / "metrics.json").read_text())
    assert [e.value for e in events.Scalars("test/acc")] == [pytest.approx(metrics["test/acc"])]
    assert max(e.value for e in events.Scalars("val/acc")) == pytest.approx(metrics["val/acc"])


@pytest.mark.slow
def test_report_rebuilds_an_interrupted_sweep(design_card_sweep, tmp_path):
    sweep = tmp_path / "copy"
    shutil.copytree(design_card_sweep, sweep)
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep / name).unlink()
    (sweep / "5" / "metrics.json").unlink()  # killed before it finished
    (sweep / "5" / "job.json").unlink()
    assert report.main([str(sweep)]) == 0
    rows = {r["job"]: r for r in read_csv(sweep / "summary.csv")}
    assert len(rows) == 8 and rows["5"]["status"] == report.NO_RESULT and rows["5"]["test_acc"] == ""
    assert (sweep / "summary.png").exists() and (sweep / "summary.md").exists()
    assert report.main([str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_test_script_on_a_sweep_prints_the_table(design_card_sweep, tmp_path):
    result = run_script("test.py", f"ckpt={design_card_sweep}", f"hydra.run.dir={tmp_path / 'test'}", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| job | max_epochs | batch_size | lr | status |" in result.stdout
    rows = read_csv(tmp_path / "test" / "summary.csv")
    original = {r["job"]: r for r in read_csv(design_card_sweep / "summary.csv")}
    assert len(rows) == 8
    for row in rows:
        assert float(row["test_acc"]) == pytest.approx(float(original[row["job"]]["test_acc"]))
        # each job's test is a TensorBoard run of its own, named after the job
        events = EventAccumulator(str(tmp_path / "test" / "tensorboard" / f"job{row['job']}"))
        events.Reload()
        assert [e.value for e in events.Scalars("test/acc")] == [pytest.approx(float(row["test_acc"]))]
    assert not list((tmp_path / "test" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_failing_job_keeps_its_row_and_the_others_run(tmp_path):
    # the default sweep dir, outputs/multirun/<date>/<time>_<us> (its ${now:} must not be resolved twice)
    result = run_script("train.py", "-m", *TINY, "trainer.max_epochs=1", "optim.lr=-1,1e-3", cwd=tmp_path)
    assert result.returncode == 1  # Hydra reports that a job failed, after running all of them
    (tmp_path,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert "Traceback" not in result.stderr or result.stderr.count('File "') <= 2
    rows = {r["job"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert rows["0"]["status"] == "failed: optim.lr must be > 0, got -1" and rows["0"]["test_acc"] == ""
    assert rows["1"]["status"] == "ok" and float(rows["1"]["test_acc"]) >= 0
    assert list(rows) == ["1", "0"]  # the good job first
    assert (tmp_path / "summary.md").exists() and (tmp_path / "summary.png").exists()


def test_summary_plot_has_epoch_ticks_and_shows_one_epoch_jobs():
    rows = [
        {"job": str(i), "max_epochs": 1, "batch_size": 32, "lr": 1e-3, "status": "ok", "test_acc": 0.5, "history": [{"epoch": 0, "val/acc": 0.4}]}
        for i in range(3)
    ] + [
        {
            "job": "3",
            "max_epochs": 3,
            "batch_size": 32,
            "lr": 1e-4,
            "status": "ok",
            "test_acc": 0.6,
            "history": [{"epoch": e, "val/acc": 0.5} for e in range(3)],
        }
    ]
    fig = report.figure(rows, [], "sweep")
    curves = fig.axes[1]
    fig.canvas.draw()
    ticks = [t for t in curves.get_xticks() if curves.get_xlim()[0] <= t <= curves.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    lines = curves.get_lines()
    assert len(lines) == 4 and len(curves.get_legend().get_texts()) == 4
    single = [line for line in lines if len(line.get_xdata()) == 1]
    # each 1-epoch job at the same point stays visible: its own marker shape, drawn open and larger than the curves' dots
    assert len({line.get_marker() for line in single}) == 3
    assert all(line.get_markersize() > lines[-1].get_markersize() and line.get_markerfacecolor() == "none" for line in single)
    plt.close(fig)


def fake_sweep(sweep: Path, jobs: list[tuple[float | None, float, list[dict]]]) -> Path:
    """Job dirs as a finished sweep leaves them, one per (val_acc, test_acc, history), without training."""
    for i, (val_acc, test_acc, history) in enumerate(jobs):
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        lr = 1e-3 * (i + 1)
        val_size = 0 if val_acc is None else 200
        (job / ".hydra" / "config.yaml").write_text(
            f"trainer:\n  max_epochs: 2\ndata:\n  batch_size: 32\n  val_size: {val_size}\noptim:\n  lr: {lr}\n"
        )
        (job / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- data.val_size={val_size}\n")
        (job / "metrics.json").write_text(json.dumps({"val/acc": val_acc, "test/acc": test_acc, "test/loss": 1.0, "epochs": 2}))
        (job / "run.json").write_text(json.dumps({"params": 10, "ckpt": str(job / "checkpoints" / "last.ckpt"), "history": history}))
        (job / "job.json").write_text(json.dumps({"status": "ok"}))
    return sweep


def train_history(acc: float) -> list[dict]:
    return [{"epoch": e, "train/loss_epoch": 2.0 - e, "train/acc": acc + 0.1 * e} for e in range(2)]


def bar_colors(fig) -> list[tuple]:
    """The left panel's bar colours, top bar first."""
    return [bar.get_facecolor() for bar in fig.axes[0].patches][::-1]


GREEN = matplotlib.colors.to_rgba("tab:green")


def test_report_without_a_val_split_keeps_job_order_and_chooses_no_best(tmp_path):
    """data.val_size=0: the test split must not rank the jobs nor pick a best, in the table or in the plot."""
    sweep = fake_sweep(tmp_path / "sweep", [(None, 0.2, train_history(0.3)), (None, 0.6, train_history(0.5)), (None, 0.4, train_history(0.4))])
    report.rebuild(sweep)
    assert [r["job"] for r in read_csv(sweep / "summary.csv")] == ["0", "1", "2"]
    md = (sweep / "summary.md").read_text()
    assert "(best)" not in md and report.NO_VAL_NOTE in md.splitlines()
    rows, extra = report.collect(sweep)
    fig = report.figure(rows, extra, "sweep")
    bars, curves = fig.axes
    assert GREEN not in bar_colors(fig) and "best by val acc" not in bars.get_title() and "no best" in bars.get_title()
    assert curves.get_ylabel() == "train accuracy (%)" and "train accuracy per epoch" in curves.get_title()
    assert [list(line.get_ydata()) for line in curves.get_lines()] == [
        pytest.approx([30, 40]),
        pytest.approx([50, 60]),
        pytest.approx([40, 50]),
    ]
    plt.close(fig)


def test_report_ranks_by_val_acc_only(tmp_path):
    """Equal val_acc keeps job order (test_acc never breaks the tie); a job without val_acc comes after, in job order, however high its test_acc."""
    val_history = [{"epoch": 0, "val/acc": 0.5}]
    sweep = fake_sweep(
        tmp_path / "sweep", [(None, 0.9, train_history(0.9)), (0.5, 0.1, val_history), (0.5, 0.8, val_history), (0.7, 0.2, val_history)]
    )
    report.rebuild(sweep)
    assert [r["job"] for r in read_csv(sweep / "summary.csv")] == ["3", "1", "2", "0"]
    md = (sweep / "summary.md").read_text()
    assert "**3 (best)**" in md and md.count("(best)") == 1
    assert "Job 0 has no validation split (data.val_size=0): listed after the ranked jobs, in job order, not ranked." in md.splitlines()
    rows, extra = report.collect(sweep)
    fig = report.figure(rows, extra, "sweep")
    assert bar_colors(fig)[0] == GREEN and bar_colors(fig).count(GREEN) == 1
    assert "green: best by val acc" in fig.axes[0].get_title() and fig.axes[1].get_ylabel() == "val accuracy (%)"
    assert len(fig.axes[1].get_lines()) == 3  # the val curves; job 0 has none
    plt.close(fig)


def test_summary_plot_without_per_epoch_data_says_so():
    rows = [
        {"job": str(i), "max_epochs": 1, "batch_size": 32, "lr": 1e-3, "status": "ok", "val_acc": None, "test_acc": 0.5, "history": []}
        for i in range(2)
    ]
    fig = report.figure(rows, [], "sweep")
    curves = fig.axes[1]
    assert not curves.get_lines() and not curves.axison
    assert any(text.get_text().startswith("no per-epoch curve") for text in curves.texts)
    plt.close(fig)


def test_rollout_rows_sum_to_one():
    torch.manual_seed(0)
    net = ViT(patch_size=8, emb_size=32, img_size=32, depth=3, n_classes=4, num_heads=4).eval()
    rollout = net.attention_rollout(torch.randn(2, 3, 32, 32))
    assert rollout.shape == (2, 17, 17)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 17))
    assert (rollout >= 0).all()
    assert all(not m.keep_attention and m.last_attention is None for m in net.attention_modules())
    saliency = predict.patch_saliency(net, torch.randn(1, 3, 32, 32))
    assert saliency.shape == (1, 4, 4) and saliency.max() == pytest.approx(1.0)


def test_predict_agrees_with_the_model(trained_run, make_cfg, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (50, 70), 128).save(images / "gray.png")  # grayscale, another size
    Image.new("RGBA", (32, 32), (200, 10, 10, 128)).save(images / "rgba.png")
    torch.manual_seed(1)
    pixels = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(images / "noise.jpg", quality=95)
    cfg = make_cfg([f"ckpt={trained_run}", f"image={images}", "top_k=3", "attention=true"], name="predict", tiny=False, run="predict")
    results = predict.predict(cfg)
    assert [Path(r["image"]).name for r in results] == ["gray.png", "noise.jpg", "rgba.png"]
    module = evaluation_module(next((trained_run / "checkpoints").glob("epoch*.ckpt")))
    net, config = module.net, module.hparams["config"]
    files = [Path(r["image"]) for r in results]
    _, x = predict.model_input(files, config["data"])
    with torch.no_grad():
        probs = net(x).softmax(-1)
    for result, p in zip(results, probs):
        assert len(result["top"]) == 3
        name, prob = result["top"][0]
        assert name == config["classes"][int(p.argmax())] and prob == pytest.approx(float(p.max()), abs=1e-6)
        assert Path(result["attention"]).exists()
    rows = read_csv(tmp_path / "predict" / "predictions.csv")
    assert [Path(r["image"]).name for r in rows] == ["gray.png", "noise.jpg", "rgba.png"]
    assert "gray.png: " in capsys.readouterr().out
