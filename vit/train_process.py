"""One seed's ``python train.py`` in a child process, for ``python -m vit.reproduce``: started in its own process group,
its output passed through as it comes, timed from its start to its accuracy line, and stopped as Ctrl-C stops
``train.py`` (a checkpoint to resume from).
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ACCURACY_LINE = re.compile(rb"Accuracy on test set: ([\d.]+)%")
STOP_GRACE_S = 120  # how long a stopped run may take to write its checkpoint and exit before it is terminated


class Stopped(Exception):
    """SIGTERM, handled as Ctrl-C is."""


@dataclass
class Run:
    """One seed's ``python train.py`` in a subprocess: started, streamed, timed, and stopped cleanly when asked."""

    args: list[str]  # after python train.py, hydra.run.dir included
    run_dir: Path
    process: subprocess.Popen | None = None
    seconds: float | None = None  # from its start to its accuracy line
    interrupted: bool = False
    started: float = 0.0
    stderr_lines: list[bytes] = field(default_factory=list)
    stderr_thread: threading.Thread | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines as they come, the accuracy line when it is printed
        if sys.stdout.isatty():
            env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))  # the progress bar's width through the pipe
        # Its own process group: a Ctrl-C in the terminal reaches this process only, which passes exactly one on.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *self.args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **group,
        )
        self.stderr_thread = threading.Thread(target=self._pass_stderr, daemon=True)
        self.stderr_thread.start()

    def _pass_stderr(self) -> None:
        """The child's stderr to ours as it comes; once stopped, kept back (a traceback of the interrupt says nothing)."""
        for line in iter(self.process.stderr.readline, b""):
            if self.interrupted:
                self.stderr_lines.append(line)
            else:
                write(sys.stderr, line)

    def stream(self) -> int:
        """Passes its stdout through byte by byte (the progress bar's carriage returns too) and times its accuracy line."""
        fd, tail = self.process.stdout.fileno(), b""
        while chunk := os.read(fd, 65536):
            write(sys.stdout, chunk)
            if self.seconds is None:
                tail = (tail + chunk)[-4096:]
                if ACCURACY_LINE.search(tail):
                    self.seconds = time.perf_counter() - self.started
        code = self.process.wait()
        self.stderr_thread.join()
        return code

    def stop(self) -> None:
        """As Ctrl-C stops ``train.py``: one SIGINT (Lightning writes ``interrupted.ckpt`` and exits), then SIGTERM
        after ``STOP_GRACE_S`` or at a second Ctrl-C; its traceback, if the interrupt came before training, not shown."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        self.interrupted = True
        process.send_signal(signal.SIGINT)
        deadline, fd = time.monotonic() + STOP_GRACE_S, process.stdout.fileno()
        try:
            while (left := deadline - time.monotonic()) > 0:  # its last lines (what it saved) as they come
                if select.select([fd], [], [], min(left, 1.0))[0]:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    write(sys.stdout, chunk)
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except (subprocess.TimeoutExpired, KeyboardInterrupt, Stopped):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.stderr_thread.join(timeout=5)
        kept = b"".join(self.stderr_lines).decode(errors="replace")
        kept = kept.split("Traceback (most recent call last)")[0].rstrip()
        if kept:
            print(kept, file=sys.stderr)

    def kept(self) -> str:
        """One line: what the stopped run left, and how to go on from it."""
        checkpoints = self.run_dir / "checkpoints"
        for name in ("interrupted.ckpt", "last.ckpt"):
            if (checkpoints / name).is_file():
                resume = " ".join(shlex.quote(a) for a in self.args if not a.startswith("hydra.run.dir="))
                return f"Stopped: {self.run_dir} kept, with checkpoints/{name}: go on with python train.py {resume} ckpt_path={self.run_dir}"
        if self.run_dir.is_dir():
            return f"Stopped: {self.run_dir} kept, with no checkpoint yet (nothing to resume)"
        return "Stopped before the run wrote anything: nothing kept"


def write(stream: Any, data: bytes) -> None:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode(errors="replace"))
        stream.flush()
