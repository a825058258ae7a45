"""verl loads erc-verl through its `verl.plugins` entry point, whichever package a process imports first."""

import os
import subprocess
import sys

import pytest

CHECK = (
    "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as L; "
    "from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY as T; "
    "print(all(m in L for m in ('erc_dapo', 'erc_gppo', 'gppo')), all(m in T for m in ('erc_sync',)))"
)


def _python(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("first_import", ["verl", "erc_verl.config", "erc_verl.losses", "erc_verl.cli"])
def test_registered_in_a_fresh_process(first_import):
    assert _python(f"import {first_import}; {CHECK}") == "True True"


def test_registration_comes_from_the_entry_point():
    # with verl's plugin discovery off, importing verl alone registers nothing of ours
    assert _python(f"import verl; {CHECK}", VERL_USE_EXTERNAL_PLUGINS="none") == "False False"
