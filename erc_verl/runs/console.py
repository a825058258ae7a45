"""The compact console of `erc-verl train`: a start summary, one line per step, the report at the end.

verl's `console` logger prints the whole metrics dictionary (100+ keys) every step from the TaskRunner, between
the output of every Ray worker. A recipe with `erc_verl.console: true` (the CPU default) gets instead, printed by
the driver from the run's metrics JSONL (verl's `file` logger, `erc_verl.metrics_file`) as rows arrive::

    step  7/40 | 2.41 s | reward 0.613 | val acc 52.3% | erc_clipfrac 0.0120 | H ratio 0.972-1.043 | ETA 1m22s

Every metric stays in the JSONL. The Ray workers' own output then goes only to Ray's log files
(`ray_init.log_to_driver=False`, unless the recipe sets it). verl's full console is one override away:
`trainer.logger=[console,file]` turns this console off and the workers' output back on.
"""

import contextlib
import json
import os
import sys
import threading
import time

from omegaconf import DictConfig, OmegaConf, open_dict

from erc_verl.runs.report import ERC_CLIPFRAC, RATIO_MAX, RATIO_MIN, REWARD, STEP_TIME, fmt_duration

TESTING_TIME = "timing_s/testing"
PREFIX = "[erc-verl]"


def val_accuracy(data: dict) -> float | None:
    """verl's headline validation accuracy in one row (``val-core/<source>/acc/mean@<n>``), if measured there."""
    keys = sorted(k for k in data if k.startswith("val-core/") and "/acc/mean@" in k)
    return float(data[keys[0]]) if keys else None


def validation_steps(after: int, total: int, test_freq: int) -> int:
    """How many validations verl still runs after step `after` (every `test_freq` steps and after the last)."""
    if test_freq <= 0:
        return 0
    return sum(1 for s in range(after + 1, total + 1) if s % test_freq == 0 or s == total)


def eta_seconds(history: list[dict], step: int, total: int, test_freq: int, window: int = 5) -> float | None:
    """Time left after `step`: the last `window` steps' mean step time for each remaining step, plus the mean
    validation time so far for each remaining validation. None before the first timed step."""
    steps = [d[STEP_TIME] for d in history if STEP_TIME in d][-window:]
    if not steps:
        return None
    tests = [d[TESTING_TIME] for d in history if TESTING_TIME in d]
    left = (total - step) * sum(steps) / len(steps)
    if tests:
        left += validation_steps(step, total, test_freq) * sum(tests) / len(tests)
    return left


def _num(data: dict, key: str, fmt: str) -> str:
    value = data.get(key)
    return "-" if value is None else format(float(value), fmt)


def step_line(step: int, total: int, data: dict, eta_s: float | None) -> str:
    """The one line printed for training step `step` (its metrics row `data`)."""
    width = len(str(total))
    acc = val_accuracy(data)
    fields = [
        f"step {step:>{width}}/{total}",
        f"{_num(data, STEP_TIME, '.2f')} s",
        f"reward {_num(data, REWARD, '.3f')}",
        f"val acc {'  -  ' if acc is None else format(acc, '.1%'):>5}",
    ]
    if ERC_CLIPFRAC in data:  # an ERC loss
        fields.append(f"erc_clipfrac {_num(data, ERC_CLIPFRAC, '.4f')}")
        fields.append(f"H ratio {_num(data, RATIO_MIN, '.3f')}-{_num(data, RATIO_MAX, '.3f')}")
    fields.append(f"ETA {'-' if eta_s is None else fmt_duration(eta_s)}")
    return " | ".join(fields)


def validation_line(data: dict) -> str | None:
    """The line for the validation verl runs before training (step 0), if it measured an accuracy."""
    acc = val_accuracy(data)
    return None if acc is None else f"{PREFIX} validation before training: val acc {acc:.1%}"


class Progress(threading.Thread):
    """Follows verl's file logger output (`path`, rewritten from scratch when the run starts) and prints a line per
    row; `stop()` prints whatever arrived last."""

    def __init__(self, path: str, total: int, test_freq: int, out=None, poll_s: float = 0.5):
        super().__init__(daemon=True, name="erc-verl-console")
        self.path, self.total, self.test_freq = path, total, test_freq
        self.out, self.poll_s = out or sys.stdout, poll_s
        self.history: list[dict] = []
        self._offset, self._partial = 0, b""
        self._stopping = threading.Event()
        self.started = time.monotonic()
        self.logs_hint = ""

    def run(self) -> None:
        while not self._stopping.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()
        self.poll()

    def __enter__(self) -> "Progress":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        took = fmt_duration(time.monotonic() - self.started)
        if exc_type is None:
            print(f"{PREFIX} training finished in {took}", file=self.out, flush=True)
        elif self.logs_hint:
            print(f"{PREFIX} the run failed after {took}; {self.logs_hint}", file=self.out, flush=True)

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() < self._offset:  # the logger started the file over
                    self._offset, self._partial = 0, b""
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            self.show(int(row["step"]), row["data"])

    def show(self, step: int, data: dict) -> None:
        if step == 0:
            line = validation_line(data)
        else:
            self.history.append(data)
            line = step_line(step, self.total, data, eta_seconds(self.history, step, self.total, self.test_freq))
        if line:
            print(line, file=self.out, flush=True)


def wanted(cfg: DictConfig) -> bool:
    """The recipe asks for this console, verl's own console logger is off and verl's file logger is on."""
    loggers = OmegaConf.select(cfg, "trainer.logger", default=[]) or []
    loggers = [loggers] if isinstance(loggers, str) else list(loggers)
    return (
        bool(OmegaConf.select(cfg, "erc_verl.console", default=False))
        and bool(OmegaConf.select(cfg, "erc_verl.metrics_file"))
        and "console" not in loggers
        and "file" in loggers
    )


def follow(cfg: DictConfig, attempt_file: str):
    """A context to run the training in: if the config wants this console, it prints the start summary, then a line
    per metrics row of `attempt_file` (where verl's file logger writes this attempt) and how it ended, and it keeps
    the Ray workers' output off the terminal unless the config says otherwise. Otherwise it does nothing."""
    if not wanted(cfg):
        return contextlib.nullcontext()
    ray_init = cfg.ray_kwargs.ray_init
    if OmegaConf.select(ray_init, "log_to_driver") is None:
        with open_dict(ray_init):
            ray_init.log_to_driver = False
    trainer = cfg.trainer
    total, test_freq = int(trainer.total_training_steps), int(trainer.test_freq)
    when = ["before training"] if trainer.get("val_before_train", True) else []
    when += [f"every {test_freq} steps"] if test_freq > 0 else []
    validation = f"validation {' and '.join(when)}" if when else "no validation"
    logs = f"Ray worker logs: {OmegaConf.select(ray_init, '_temp_dir') or '/tmp/ray'}/session_latest/logs"
    print(
        f"{PREFIX} {trainer.experiment_name}: {total} steps of {cfg.data.train_batch_size} prompts x "
        f"{cfg.actor_rollout_ref.rollout.n} samples, {validation}\n"
        f"{PREFIX} every metric: {os.path.abspath(cfg.erc_verl.metrics_file)}; verl's own console: "
        f"trainer.logger=[console,file]; {logs}\n"
        f"{PREFIX} starting Ray and verl's workers...",
        flush=True,
    )
    progress = Progress(attempt_file, total, test_freq)
    progress.logs_hint = logs if not ray_init.log_to_driver else ""
    return progress
