"""Any result re-run by one command, and compared with what was recorded:

    python -m vit.reproduce --list                  # the results, by name
    python -m vit.reproduce fast                    # the row's command, with its first recorded seed
    python -m vit.reproduce fast seed=0,1           # one run per seed
    python -m vit.reproduce fast data.root=DIR      # other key=value arguments go to train.py as they are

The results live in one registry, ``docs/frontier.json`` (``vit.registry`` reads it; its ``schema`` says what each
field holds), which the README's results table and ``bench/frontier.py``'s picture are checked against / drawn from. For a row whose
command is ``python train.py ...`` this first times a slice of the manual's training loop as printed
(``vit.manual.Recipe.time_slice``, as ``bench/time_to_accuracy.py`` does) on this machine and the row's data (where
a recorded time can be scaled by it), then
runs the command in a subprocess (``vit.train_process``: its output and progress bar shown as they come, run dir
``--out``/seed<N>), timed from its start to its ``Accuracy on test set`` line, and prints one verdict per seed
(``vit.verdicts``): the accuracy against the
recorded seeds' spread, and the time against each recorded time scaled by the two machines' speeds of the manual's
loop, then their spread and whether this run is inside it. Where no manual-loop speed was measured with a recorded
time, the verdict says that time can't be scaled. A row recorded on CPUs reruns on the CPU where a GPU is here
(``trainer.accelerator=cpu``, as its ``trainer.precision``); a GPU run gets no time verdict against CPU records. The
``manual`` row (the manual's own code, its time projected) is checked by projecting its time here.

Ctrl-C stops the run as Ctrl-C stops ``train.py`` (a checkpoint to resume from), says in one line what was kept
and exits with 130.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vit.errors import ConfigError
from vit.machine import core_count, cpu_name
from vit.registry import REGISTRY, Registry, Row, load_registry
from vit.train_process import Run, Stopped
from vit.verdicts import DEVICES, expectation, not_recorded, seconds_text, time_verdicts, uses_manual_speed, verdicts

ROOT = Path(__file__).resolve().parents[1]


def list_rows(registry: Registry) -> str:
    """``--list``: each row's name, headline accuracy (and spread), time and machine, then its command."""
    lines = []
    for row in registry.rows:
        head = row.headline
        accuracy = f"{head.accuracy:.2f}%"
        if len(row.results) > 1:
            low, high = row.spread
            accuracy += f" ({len(row.results)} runs: {low:.2f}-{high:.2f}%)"
        speed = head.machine.manual_images_per_s
        when = (
            "time not recorded"
            if head.seconds is None
            else f"{'projected ' if head.projected else ''}{seconds_text(head.seconds)} on {head.machine.cpu or 'a 2-core CPU'}"
            + (f" ({speed:g} manual images/s)" if speed else " (manual loop not timed there)")
        )
        lines.append(f"{row.name:<21} {accuracy:<30} {when}\n{'':<22}{row.command}")
    return "\n".join(lines)


def last_value(args: list[str], key: str) -> str | None:
    """The value the last ``key=value`` (or ``key value`` for a ``--flag``) in ``args`` gives, or None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(key + "="):
            value = arg.split("=", 1)[1]
        elif key.startswith("--") and arg == key and i + 1 < len(args):
            value = args[i + 1]
    return value


def row_data(row: Row, overrides: list[str]) -> tuple[str, Path | None]:
    """(the data's name, the ImageFolder root or None): where the manual's loop is timed, as the row's run reads it."""
    args = [*row.args, *overrides]
    if row.kind == "manual":
        kind, root = last_value(row.args, "--data") or "folder", last_value(row.args, "--root")
        root = last_value(overrides, "data.root") or root
    else:
        kind, root = last_value(args, "data") or "cifar10", last_value(args, "data.root")
    if kind != "folder":
        return kind, None
    if not root:
        raise ConfigError(f"{row.name} reads data=folder without data.root: add data.root=DIR (a folder with train/ and test/)")
    path = Path(root) if Path(root).is_absolute() else ROOT / root
    if not (path / "train").is_dir():
        raise ConfigError(f"data.root={root} has no train/ folder: give the ImageFolder copy of CIFAR-10 with data.root=DIR")
    return kind, path.resolve()


def manual_images_per_s(root: Path | None, seed: int, warmup: int, steps: int, device: str = "cpu") -> float:
    """The manual's loop as printed (``vit.manual``) on ``root`` (an ImageFolder; None: torchvision's FakeData),
    timed over ``steps`` steps after ``warmup``: its training images per second on this machine."""
    return _projection(root, seed, warmup, steps, device, with_test=False).images_per_s


def manual_projection(root: Path | None, seed: int, warmup: int, steps: int, device: str = "cpu") -> tuple[float, float]:
    """(projected seconds of the manual's 20 epochs, its images/s) as ``bench/time_to_accuracy.py`` projects them:
    set-up and test pass timed whole, the epoch from a timed slice."""
    from vit import manual

    p = _projection(root, seed, warmup, steps, device)
    print(
        f"the manual: set-up {p.setup_s:.1f} s, {steps} timed steps at {p.images_per_s:.1f} images/s -> {p.epoch_s:,.0f} s per epoch of "
        f"{p.steps_per_epoch:,} steps, test pass {p.test_s:.1f} s: {manual.NUM_EPOCHS} epochs = {seconds_text(p.total_s)} projected",
        flush=True,
    )
    return p.total_s, p.images_per_s


def _projection(root: Path | None, seed: int, warmup: int, steps: int, device: str, with_test: bool = True) -> Any:
    import torch

    from vit import manual

    p = manual.project(root, torch.device(device), seed, warmup, steps, time.perf_counter, with_test)
    if p is None:
        raise ConfigError(f"the manual's epoch has fewer than {warmup + steps} steps: lower --manual-warmup/--manual-steps")
    return p


def warm_cache(root: Path, data_dir: Path) -> None:
    """Decodes the image files into the project's cache before the clock starts, as the race did (once per machine)."""
    from vit.data import FolderDataModule

    began = time.perf_counter()
    FolderDataModule(root=str(root), data_dir=str(data_dir), val_size=0).setup()
    print(f"decode cache warm in {data_dir / 'cache'} ({time.perf_counter() - began:.1f} s, outside the clock)", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vit.reproduce",
        description="Re-run one result of the README (a row of docs/frontier.json) and compare it with what was recorded.",
        epilog="Other key=value arguments go to train.py as they are (paths relative to the repository root).",
    )
    parser.add_argument("name", nargs="?", help="the row (python -m vit.reproduce --list)")
    parser.add_argument("overrides", nargs="*", help="seed=N or seed=N,M,... (default: the row's first recorded seed), key=value for train.py")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--out", type=Path, default=None, help="run dirs go to OUT/seed<N> (default: outputs/reproduce/NAME/<date>_<time>)")
    parser.add_argument("--registry", type=Path, default=REGISTRY, help="the results registry (default: docs/frontier.json)")
    parser.add_argument("--manual-steps", type=int, default=200, help="timed steps of the manual's loop (default 200, as the race)")
    parser.add_argument("--manual-warmup", type=int, default=10, help="untimed steps before them (default 10)")
    return parser.parse_intermixed_args(argv)


def split_seeds(row: Row, overrides: list[str]) -> tuple[list[int], list[str]]:
    """The seeds to run (``seed=42,0,1``; default the row's first recorded one) and the other overrides."""
    seeds, rest = None, []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "seed" and value:
            try:
                seeds = [int(s) for s in value.split(",")]
            except ValueError:
                raise ConfigError(f"seed={value} is not a seed: give an integer or a comma list, e.g. seed=42,0,1") from None
        elif key.lstrip("+~") == "hydra.run.dir":
            raise ConfigError("vit.reproduce names each seed's run dir itself: give --out DIR instead of hydra.run.dir= (runs go to DIR/seed<N>)")
        elif key.lstrip("+~") == "paths.output_dir" and row.kind == "train":
            continue  # where the runs go, as --out (output_dir): not what they train
        else:
            rest.append(arg)
    if row.kind == "manual" and any(not a.startswith("data.root=") for a in rest):
        raise ConfigError(f"the manual row runs the manual's own code: it takes seed=N and data.root=DIR only, not {' '.join(rest)}")
    return seeds or [row.headline.seed], rest


def output_dir(out: Path | None, overrides: list[str]) -> Path | None:
    """Where the runs go: ``--out DIR``, or the user's ``paths.output_dir=DIR`` (relative to the repository root, as
    train.py reads it), which means the same here: each seed's run dir is DIR/seed<N>, its hydra.run.dir and output_dir."""
    given = last_value([a.lstrip("+") for a in overrides], "paths.output_dir")
    if given is None:
        return out
    path = Path(given) if Path(given).is_absolute() else ROOT / given
    if out is not None and out.resolve() != path.resolve():
        raise ConfigError(f"--out {out} and paths.output_dir={given} name two places for the runs: give one of them")
    return path


def run_dirs(name: str, out: Path | None, seeds: list[int]) -> dict[int, Path]:
    out = out if out is not None else ROOT / "outputs" / "reproduce" / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    dirs = {seed: (out / f"seed{seed}").resolve() for seed in seeds}
    for run_dir in dirs.values():
        if (run_dir / "metrics.json").exists() or (run_dir / "checkpoints").exists():
            raise ConfigError(f"{run_dir} already holds a run: give another --out DIR")
    return dirs


def here_description(images_per_s: float, data: str) -> str:
    import torch

    threads = torch.get_num_threads()
    return (
        f"this machine: {cpu_name()} ({core_count()} cores, {threads} torch thread{'s' if threads != 1 else ''}); "
        f"the manual's loop: {images_per_s:.1f} images/s on {data}"
    )


def reproduce_manual(row: Row, seeds: list[int], overrides: list[str], args: argparse.Namespace) -> int:
    """The ``manual`` row: its 20 epochs projected here as the race projects them, against the recorded projection."""
    kind, root = row_data(row, overrides)
    print(f"{row.name}: {row.what}, as {row.command} projects it (its steps on this machine, {args.manual_steps} timed)", flush=True)
    for seed in seeds:
        total, images_per_s = manual_projection(root, seed, args.manual_warmup, args.manual_steps)
        print(here_description(images_per_s, str(root) if root else "torchvision's FakeData"))
        head = row.headline
        note = not_recorded(overrides)
        print(
            f"seed {seed}: accuracy not checked: {head.accuracy:.2f}% is {head.note or 'the recorded figure'} "
            f"(the manual's recipe run to the end here: python -m vit.reproduce seed){note}"
        )
        for line in time_verdicts(row, head.seed, total, images_per_s, projected=True):
            print(f"  {line}{note}")
    return 0


def recorded_precision(row: Row, overrides: list[str]) -> str | None:
    """``trainer.precision=P`` where the row records the precision P its results trained in and neither its command nor the
    user's overrides set one: a rerun trains as the row did, not in today's default for this machine (``vit.precision``)."""
    if not row.precision or last_value([*row.args, *overrides], "trainer.precision") is not None:
        return None
    return f"trainer.precision={row.precision}"


def recorded_device(row: Row, overrides: list[str]) -> str | None:
    """``trainer.accelerator=cpu`` where a CUDA GPU is here, the row's results ran on CPUs and neither its command nor the
    user's overrides choose the accelerator: a rerun trains where the row did, and its time can be judged."""
    if row.device != "cpu" or last_value([*row.args, *overrides], "trainer.accelerator") is not None:
        return None
    return "trainer.accelerator=cpu" if run_device(row.args) == "gpu" else None


def run_device(args: list[str]) -> str:
    """``gpu`` where a ``python train.py`` of ``args`` trains on a CUDA GPU (one is here, trainer.accelerator auto or gpu), else ``cpu``."""
    from vit.precision import on_cuda

    return "gpu" if on_cuda({"accelerator": last_value(args, "trainer.accelerator") or "auto"}) else "cpu"


def reproduce_train(row: Row, seeds: list[int], overrides: list[str], args: argparse.Namespace, session: dict) -> int:
    """A ``python train.py`` row: the manual's slice, then one run per seed, each with its verdict."""
    from vit.cli import check_overrides

    dirs = run_dirs(row.name, output_dir(args.out, args.overrides), seeds)
    print(
        f"{row.name}: {row.what}; seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; run dirs under {dirs[seeds[0]].parent}",
        flush=True,
    )
    for seed in seeds:  # a mistyped key stops here, in one line, before minutes of timing
        check_overrides(ROOT / "conf", "train", [*row.args, *overrides, f"seed={seed}", f"hydra.run.dir={dirs[seed]}"])
    kind, root = row_data(row, overrides)
    if root is not None:
        data_dir = last_value([*row.args, *overrides], "paths.data_dir")
        warm_cache(root, Path(data_dir) if data_dir else ROOT / "data")
    note = not_recorded(overrides)
    precision, accelerator = recorded_precision(row, overrides), recorded_device(row, overrides)
    pinned = [p for p in (precision, accelerator) if p]
    if precision:
        print(f"precision: {row.precision}, as recorded (the row's results trained in it; {precision} added to the command)", flush=True)
    if accelerator:
        print(f"device: cpu, as recorded (a CUDA GPU is here, the row's results ran on CPUs; {accelerator} added to the command)", flush=True)
    device = run_device([*row.args, *overrides, *pinned])
    here = None
    if uses_manual_speed(row, device):
        print(f"timing the manual's loop ({args.manual_steps} steps after {args.manual_warmup}) ...", flush=True)
        here = manual_images_per_s(root, seeds[0], args.manual_warmup, args.manual_steps)
        print(here_description(here, str(root) if root else f"data={kind} (torchvision's FakeData)"), flush=True)
    else:
        print(f"the manual's loop not timed: no time of this row on a {DEVICES[device]} can be scaled by it", flush=True)
    for seed in seeds:
        run = Run([*row.args, *overrides, *pinned, f"seed={seed}", f"hydra.run.dir={dirs[seed]}"], dirs[seed])
        session["run"] = run
        print(f"\n{row.name}, seed {seed}: python train.py {' '.join(shlex.quote(a) for a in run.args)}", flush=True)
        expected = expectation(row, seed, here, device)
        if expected:
            print(expected + note, flush=True)
        run.start()
        code = run.stream()
        session["run"] = None
        session["done"].append(run.run_dir)
        if code != 0:
            print(f"Error: seed {seed}'s run failed (exit {code}; its output is above): fix what it says, then run this again", file=sys.stderr)
            return 1
        print("\n" + "\n".join(verdicts(row, seed, run.run_dir, run.seconds, here, device, note)))
        print(f"  run dir: {run.run_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    session: dict[str, Any] = {"run": None, "done": []}  # the run going on, the run dirs finished

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args = parse_args(argv)
        registry = load_registry(args.registry)
        if args.list:
            print(list_rows(registry))
            return 0
        if not args.name:
            raise ConfigError(f"name a result: python -m vit.reproduce NAME, NAME one of {', '.join(r.name for r in registry.rows)}")
        row = registry.row(args.name)
        seeds, overrides = split_seeds(row, args.overrides)
        if row.kind == "manual":
            return reproduce_manual(row, seeds, overrides, args)
        return reproduce_train(row, seeds, overrides, args, session)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as e:
        run, done = session["run"], session["done"]
        finished = f"; finished and kept: {', '.join(map(str, done))}" if done else ""
        if run is not None:
            run.stop()
            print(run.kept() + finished, file=sys.stderr)
        else:
            print(f"Stopped before a training run started{finished or ': nothing kept'}", file=sys.stderr)
        return 143 if isinstance(e, Stopped) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
