"""The package imports in layers: every module can be imported first in a fresh process (no import cycle through
verl's plugin loading), verl then holds everything the plugin registers, and the command line's fast paths import
neither verl nor torch."""

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import erc_verl

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(erc_verl.__path__, "erc_verl.") if not m.name.endswith("__main__")
)

# Each module is imported first in a child forked from a process that has loaded the heavy third-party libraries
# (not verl, not erc_verl): a fresh interpreter per module would cost seconds each. The child then imports verl
# and reports what the registries hold.
_CHILDREN = r"""
import importlib, json, os, sys
for dep in ("torch", "torch.distributed.fsdp", "tensordict", "transformers", "ray", "omegaconf", "hydra", "pandas",
            "sympy", "math_verify", "fastapi", "uvicorn", "transfer_queue"):
    importlib.import_module(dep)
assert not any(m == "verl" or m.startswith(("verl.", "erc_verl")) for m in sys.modules)
results, running = {}, {}

def reap():
    pid, status = os.wait()
    results[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for module in json.loads(sys.argv[1]):
    if len(running) == 2:
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
            from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as losses
            from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY as trainers
            ok = all(m in losses for m in ("erc_dapo", "erc_gppo", "gppo", "erc_cispo")) and "erc_sync" in trainers
            os._exit(0 if ok else 3)
        except BaseException:
            import traceback; traceback.print_exc()
            os._exit(4)
    running[pid] = module
while running:
    reap()
print(json.dumps(results))
"""


def test_every_module_can_be_imported_first():
    result = subprocess.run(
        [sys.executable, "-c", _CHILDREN, json.dumps(MODULES)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(codes) == set(MODULES)
    failed = {m: {3: "imported, but the registries lack erc-verl's names", 4: "import failed"}.get(c, c)
              for m, c in codes.items() if c != 0}
    assert not failed, f"{failed}\n{result.stderr[-3000:]}"


def test_layers_are_where_the_modules_say():
    # the layers the README's layout table describes; a new module must take its place in one
    layers = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert layers == {"cli", "plugin", "core", "runs", "platform", "reward", "data", "demo"}


def test_registration_comes_from_the_entry_point():
    # with verl's plugin discovery off, importing verl alone registers nothing of ours
    code = ("import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as L; "
            "print('erc_dapo' in L or 'gppo' in L)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "False", result.stderr[-2000:]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["recipes"], ["no_such_command"], ["jobs", "--help"], ["submit", "--help"], ["jobs"]],
    ids=["help", "recipes", "usage_error", "jobs_help", "submit_help", "jobs_usage_error"],
)
def test_command_line_fast_paths_import_neither_verl_nor_torch(argv):
    code = (
        "import sys; from erc_verl.cli import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'verl', 'torch', 'ray', 'transformers', 'hydra'})\n"
        "print('HEAVY', heavy, code, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("HEAVY [] "), last
