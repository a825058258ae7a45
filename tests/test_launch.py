"""launch/ without a cluster: the NCCL settings every node gets, the head address the SLURM template picks, and
the recipe names the launch documents give."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from erc_verl.runs.recipes import available
from tests import REPO_ROOT

CLUSTER_ENV = REPO_ROOT / "launch" / "cluster_env.sh"


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "ERC_", "RAY_", "SLURM_"))}
    return {**env, **extra}


def _source(script: str, **env) -> subprocess.CompletedProcess:
    """`source launch/cluster_env.sh` in a strict shell, then `script`."""
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {CLUSTER_ENV}; {script}"],
        env=_clean_env(**env), capture_output=True, text=True, timeout=30,
    )


def test_nccl_ib_settings_fit_their_verbs_fields():
    r = _source('echo "$NCCL_IB_TIMEOUT $NCCL_IB_RETRY_CNT"')
    assert r.returncode == 0, r.stderr
    timeout, retry = map(int, r.stdout.split())
    # queue-pair attributes: the local ACK timeout has 5 bits, the retry count 3 (mlx5 masks 12 to 4)
    assert 0 <= timeout <= 31 and 0 <= retry <= 7
    assert retry == 7, "as many retries as the field holds, not fewer than NCCL's default of 7"


@pytest.mark.parametrize("name, value", [("NCCL_IB_RETRY_CNT", "12"), ("NCCL_IB_TIMEOUT", "32"),
                                         ("NCCL_IB_RETRY_CNT", "seven")])
def test_out_of_range_nccl_ib_value_stops_the_node(name, value):
    r = _source("echo started", **{name: value})
    assert r.returncode != 0 and "started" not in r.stdout
    assert f"{name}={value}" in r.stderr and "0.." in r.stderr


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of stand-in commands: name -> bash body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _hostname(ip_address: str, all_addresses: str) -> str:
    """`hostname` as on a stock Ubuntu node: /etc/hosts maps the host name to 127.0.1.1."""
    return (f'case "${{1:-}}" in -i | --ip-address) echo "{ip_address}" ;; -I | --all-ip-addresses) '
            f'echo "{all_addresses}" ;; *) echo node0 ;; esac')


@pytest.mark.parametrize("all_addresses, expected", [("10.1.2.3 172.17.0.1 fd00::5", "10.1.2.3"),
                                                     ("fd00::5 192.168.7.7", "192.168.7.7")])
def test_node_ip_skips_loopback_and_ipv6(tmp_path, all_addresses, expected):
    bin_dir = _fake_bin(tmp_path, hostname=_hostname("127.0.1.1", all_addresses))
    r = _source("erc_node_ip", PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected


def _sbatch(tmp_path: Path, hostname: str) -> subprocess.CompletedProcess:
    """launch/slurm_erc.sbatch on a one-node "allocation": srun runs the address lookup here; every other step (the
    Ray head, the smoke check) is a stand-in that prints what it was given and fails, so no Ray starts."""
    srun = ('while [ $# -gt 0 ]; do case "$1" in -w) shift 2 ;; -*) shift ;; *) break ;; esac; done\n'
            'if [ "$1" = bash ]; then exec "$@"; fi\n'
            'echo "STEP ERC_NODE_IP=${ERC_NODE_IP:-} $*"; exit 3')
    bin_dir = _fake_bin(tmp_path, srun=srun, scontrol="echo node0", hostname=hostname)
    env = _clean_env(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", HOME=str(tmp_path),
        SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(REPO_ROOT),
        RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"), ERC_RAY_PORT="1", ERC_WAIT_S="30",
    )
    return subprocess.run(["bash", str(REPO_ROOT / "launch" / "slurm_erc.sbatch"), "cpu_tiny_erc_dapo"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_sbatch_stops_at_once_when_the_head_has_only_a_loopback_address(tmp_path):
    r = _sbatch(tmp_path, _hostname("127.0.1.1", ""))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "STEP" not in r.stdout, "no Ray head may start on a loopback address"
    assert "no routable IPv4 address" in r.stderr and "127.0.1.1" in r.stderr and "ERC_HEAD_IP" in r.stderr


def test_sbatch_gives_the_head_its_routable_address(tmp_path):
    r = _sbatch(tmp_path, _hostname("127.0.1.1", "10.9.8.7"))
    assert "Ray head on node0 (10.9.8.7:1)" in r.stdout, r.stdout + r.stderr
    assert "STEP ERC_NODE_IP=10.9.8.7 launch/start_ray_head.sh" in r.stdout
    assert r.returncode != 0


def test_launch_documents_name_recipes_that_exist():
    names = set(available(REPO_ROOT / "recipes"))
    used = set()
    for path in [*sorted((REPO_ROOT / "launch").iterdir()), REPO_ROOT / "docker" / "Dockerfile.gpu"]:
        text = path.read_text()
        used |= set(re.findall(r"slurm_erc\.sbatch\s+(?:--\S+\s+)*([a-z]\w+)", text))
        used |= set(re.findall(r"erc-verl (?:submit|train) ([a-z]\w+)", text))
    assert used, "the pattern found no recipe names"
    assert used <= names, f"unknown recipes in the launch documents: {sorted(used - names)}"
