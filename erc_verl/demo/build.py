"""`erc_verl.setup` hook of the CPU recipe: build (once) the tiny model, tokenizer, data and warm start.

Everything lands in ``erc_verl.demo.artifacts`` (an ignored cache directory) next to a ``spec.json`` describing what
was built; a later run with the same spec reuses it, a different spec rebuilds it. The directory is built under a
temporary name and renamed into place, so an interrupted build never leaves a half-made cache.
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, fields

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from erc_verl.demo.task import TaskSpec, corpus, split, write_parquet
from erc_verl.demo.tiny_model import ModelSpec, build_model, build_tokenizer
from erc_verl.demo.warm_start import WarmStartSpec, warm_start

# Bump when the build itself changes in a way the specs do not capture.
BUILD_VERSION = 2


def specs_from_config(cpu_cfg: DictConfig) -> tuple[TaskSpec, ModelSpec, WarmStartSpec]:
    section = OmegaConf.to_container(cpu_cfg, resolve=True)
    specs = []
    for key, cls in (("task", TaskSpec), ("model", ModelSpec), ("warm_start", WarmStartSpec)):
        given = section.get(key, {})
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"erc_verl.demo.{key}.{unknown[0]}: no such setting; the settings: {[f.name for f in fields(cls)]}"
            )
        specs.append(cls(**given))
    return tuple(specs)


def artifact_paths(root: str) -> dict[str, str]:
    return {
        "model": os.path.join(root, "model"),
        "train": os.path.join(root, "data", "train.parquet"),
        "val": os.path.join(root, "data", "val.parquet"),
        "spec": os.path.join(root, "spec.json"),
    }


def build(root: str, task: TaskSpec, model_spec: ModelSpec, ws: WarmStartSpec) -> dict:
    """Build every artifact into `root` (replaced atomically) and return the written spec."""
    spec = {"version": BUILD_VERSION, "task": asdict(task), "model": asdict(model_spec), "warm_start": asdict(ws)}
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        paths = artifact_paths(tmp)
        os.makedirs(os.path.dirname(paths["train"]))
        write_parquet(task, paths["train"], paths["val"])
        # The tokenizer sees all task text (train and held-out): it is a vocabulary, not a model of answers.
        tokenizer = build_tokenizer(corpus(task), model_spec.vocab_size)
        model = build_model(model_spec, tokenizer)
        train_exprs, _ = split(task)
        t0 = time.time()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on a busy 2-core machine one thread is several times faster than two
        try:
            result = warm_start(model, tokenizer, train_exprs, ws)
        finally:
            torch.set_num_threads(threads)
        spec["warm_start_result"] = {**result, "seconds": round(time.time() - t0, 1)}
        model.save_pretrained(paths["model"])
        tokenizer.save_pretrained(paths["model"])
        with open(paths["spec"], "w") as f:
            json.dump(spec, f, indent=2)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec


def ensure_artifacts(root: str, task: TaskSpec, model_spec: ModelSpec, ws: WarmStartSpec) -> dict[str, str]:
    """Reuse `root` if it holds exactly these specs, else (re)build it. Returns the artifact paths."""
    paths = artifact_paths(root)
    wanted = {"version": BUILD_VERSION, "task": asdict(task), "model": asdict(model_spec), "warm_start": asdict(ws)}
    try:
        with open(paths["spec"]) as f:
            have = json.load(f)
        have.pop("warm_start_result", None)
        fresh = have == wanted and all(os.path.exists(p) for p in paths.values())
    except (OSError, ValueError):
        fresh = False
    if fresh:
        print(f"[erc-verl] reusing tiny model, tokenizer and data in {root}", flush=True)
    else:
        print(f"[erc-verl] building tiny model, tokenizer, data and warm start in {root}", flush=True)
        t0 = time.time()
        spec = build(root, task, model_spec, ws)
        ws_result = spec["warm_start_result"]
        print(
            f"[erc-verl] built in {time.time() - t0:.0f}s (warm start: {ws_result['steps']} steps, "
            f"sampled accuracy {ws_result['accuracy']:.1%})",
            flush=True,
        )
    return paths


def setup(cfg: DictConfig) -> None:
    """The recipe's `erc_verl.setup` hook: make sure the artifacts the recipe points at exist.

    Relative ``erc_verl.cache_dir`` / ``run_dir`` are made absolute here (every path of the recipe interpolates
    them), so Ray workers, whatever their working directory, find the same files.
    """
    with open_dict(cfg):
        cfg.erc_verl.cache_dir = os.path.abspath(cfg.erc_verl.cache_dir)
        cfg.erc_verl.run_dir = os.path.abspath(cfg.erc_verl.run_dir)
    task, model_spec, ws = specs_from_config(cfg.erc_verl.demo)
    ensure_artifacts(cfg.erc_verl.demo.artifacts, task, model_spec, ws)
    os.makedirs(cfg.erc_verl.run_dir, exist_ok=True)
