"""A run's metrics JSONL (verl's `file` logger format): reading it, and keeping it whole across kills and resumes.

verl's file logger writes one `{"step": s, "data": {...}}` line per logged step; validation before training is
logged at step 0, later validations share the line of their training step.

verl's file logger truncates its file whenever a run starts, and a resumed run logs again from the step it
resumes at. So verl writes each attempt to `<metrics>.attempt`, and `<metrics>` is kept here:
- when a run starts, rows left by an earlier attempt (finished or killed) are folded in, then rows after the
  step the run resumes from are dropped: those steps are trained again;
- when it ends, the attempt's rows are folded in.
Folding merges rows of the same step (a resumed run validates again at the step it resumes from).

verl saves a step's checkpoint before it validates and logs that step, so a kill in between leaves a checkpoint
whose step has no row, and no later attempt would ever log it. A run that would resume there (`resume_mode=auto`)
resumes from the newest earlier checkpoint whose row was logged instead (from scratch if there is none), and
trains that step again: the row then exists exactly once and describes the weights the run goes on from.
"""

import json
import os
import re
import sys

from omegaconf import DictConfig, OmegaConf


def attempt_path(metrics_file: str) -> str:
    return metrics_file + ".attempt"


def read_rows(path: str) -> list[dict]:
    """Rows `{"step": int, "data": {...}}`; a line cut short by a kill is ignored."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row and isinstance(row.get("data"), dict):
                rows.append(row)
    return rows


def merge_rows(rows: list[dict]) -> list[dict]:
    """One row per step, in step order; later rows of a step add to (and override) earlier ones."""
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {}).update(row["data"])
    return [{"step": step, "data": by_step[step]} for step in sorted(by_step)]


def read_steps(path: str) -> list[tuple[int, dict]]:
    """(step, metrics) once per step, in step order: what reports and benchmarks read."""
    return [(row["step"], row["data"]) for row in merge_rows(read_rows(path))]


def _write(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def fold(metrics_file: str, keep_through_step: int | None = None) -> None:
    """Fold the attempt file into `metrics_file`; optionally keep only steps <= keep_through_step."""
    rows = merge_rows(read_rows(metrics_file) + read_rows(attempt_path(metrics_file)))
    if keep_through_step is not None:
        rows = [row for row in rows if row["step"] <= keep_through_step]
    _write(metrics_file, rows)
    if os.path.exists(attempt_path(metrics_file)):
        os.remove(attempt_path(metrics_file))


def resumed_step(cfg: DictConfig) -> int:
    """The global step verl will resume from under this config (0: from scratch), as its trainer finds it."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    mode = OmegaConf.select(cfg, "trainer.resume_mode", default="auto")
    if mode == "resume_path":
        return int(str(cfg.trainer.resume_from_path).rstrip("/").split("global_step_")[-1])
    if mode != "auto":
        return 0
    folder = find_latest_ckpt_path(os.path.abspath(cfg.trainer.default_local_dir))
    return int(folder.rstrip("/").split("global_step_")[-1]) if folder else 0


# Set by verl's trainers (V1 and legacy) in every training step's row, and only there (validation rows lack it).
TRAINING_ROW_KEY = "training/global_step"


def _trained_steps(metrics_file: str) -> set[int]:
    return {int(row["step"]) for row in read_rows(metrics_file) if TRAINING_ROW_KEY in row["data"]}


def resume_where_logged(cfg: DictConfig, metrics_file: str) -> None:
    """With `resume_mode=auto`, point `cfg` at the newest checkpoint whose step has a row in `metrics_file`
    (module docstring). A checkpoint without its actor folder (pruned by `max_actor_ckpt_to_keep`) cannot be
    resumed from; when only such ones are left, the run resumes where verl would and that one row stays missing."""
    step = resumed_step(cfg)
    if OmegaConf.select(cfg, "trainer.resume_mode", default="auto") != "auto" or step == 0:
        return
    logged = _trained_steps(metrics_file)
    if step in logged:
        return
    ckpt_dir = os.path.abspath(cfg.trainer.default_local_dir)
    earlier = sorted((int(m.group(1)) for m in map(re.compile(r"global_step_(\d+)").fullmatch, os.listdir(ckpt_dir))
                      if m and int(m.group(1)) < step), reverse=True)
    usable = [s for s in earlier if s in logged and os.path.isdir(os.path.join(ckpt_dir, f"global_step_{s}", "actor"))]
    missing = f"checkpoint global_step_{step} has no metrics row (the run was killed between saving and logging it)"
    if usable:
        cfg.trainer.resume_mode = "resume_path"
        cfg.trainer.resume_from_path = os.path.join(ckpt_dir, f"global_step_{usable[0]}")
        print(f"erc-verl: {missing}: resuming from global_step_{usable[0]}", file=sys.stderr, flush=True)
    elif not earlier:
        cfg.trainer.resume_mode = "disable"
        print(f"erc-verl: {missing}: it is the first checkpoint, training from scratch", file=sys.stderr, flush=True)
    else:
        print(f"erc-verl: {missing}, and no earlier checkpoint can be resumed from: resuming from it, without "
              f"step {step}'s training metrics", file=sys.stderr, flush=True)


def start(cfg: DictConfig, metrics_file: str) -> str:
    """Prepare `metrics_file` for a run of `cfg` (which may be pointed at an earlier checkpoint: see
    `resume_where_logged`); returns the path verl's file logger must write to.

    A run from scratch starts an empty file; a resumed one keeps the steps up to its checkpoint.
    """
    os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
    fold(metrics_file)  # the last attempt's rows, before deciding where this one resumes
    resume_where_logged(cfg, metrics_file)
    step = resumed_step(cfg)
    fold(metrics_file, keep_through_step=step if step > 0 else -1)
    return attempt_path(metrics_file)
