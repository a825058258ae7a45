"""`erc-verl submit` / `jobs` against a real Ray 2.60 cluster on loopback: a head started by
launch/start_ray_head.sh and a worker node joined by launch/start_ray_worker.sh.

The cluster has token authentication on, its own temp dir and free ports (other Ray tests may run on this
machine at the same time), and is torn down by signalling the scripts' PIDs.
"""

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import REPO_ROOT

pytestmark = pytest.mark.e2e  # real Ray clusters: part of the full suite, not the fast loop

HEAD_SCRIPT = REPO_ROOT / "launch" / "start_ray_head.sh"
WORKER_SCRIPT = REPO_ROOT / "launch" / "start_ray_worker.sh"
VENV_BIN = str(Path(sys.executable).parent)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_env(temp_dir: str, token: str, agent_port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ERC_"))}
    env.update(
        # `python` in the job entrypoint and `ray` in the scripts must be this environment's.
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        ERC_NODE_IP="127.0.0.1",
        ERC_NUM_GPUS="0",
        ERC_RAY_TEMP_DIR=temp_dir,
        ERC_AGENT_PORT=str(agent_port),
    )
    return env


def _start(script: Path, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["bash", str(script), *args, "--object-store-memory", str(100 * 2**20)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Cluster:
    address: str
    gcs: str
    token: str
    temp_dir: str


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(cluster, capsys, monkeypatch, tmp_path):
    """`erc-verl ...` in this process, as a user without Ray settings would run it, the token in a file."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of another test run
    from erc_verl import cli as erc_cli

    def run(*args: str, token: str | None = cluster.token, address: str | None = None) -> Result:
        args = list(args)
        # Connection flags go before any `--`, after which arguments belong to the job.
        at = args.index("--") if "--" in args else len(args)
        flags = ["--address", address or cluster.address]
        if token is not None:
            token_file = tmp_path / "token"
            token_file.write_text(token)
            flags += ["--auth-token-file", str(token_file)]
        args[at:at] = flags
        capsys.readouterr()
        rc = erc_cli.main(args)
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)

    return run


@pytest.fixture(scope="module")
def cluster():
    # Short path: Ray's unix sockets live under it and must stay under 108 characters.
    temp_dir = tempfile.mkdtemp(prefix="ercsub_", dir="/tmp")
    token = secrets.token_hex(32)
    gcs_port, dash_port, client_port, agent_port = _free_ports(4)
    env = _node_env(temp_dir, token, agent_port)
    env.update(
        ERC_RAY_PORT=str(gcs_port),
        ERC_DASHBOARD_PORT=str(dash_port),
        ERC_DASHBOARD_HOST="127.0.0.1",
        ERC_CLIENT_PORT=str(client_port),
        ERC_NUM_CPUS="2",
    )
    procs = []
    address = f"http://127.0.0.1:{dash_port}"
    try:
        head = _start(HEAD_SCRIPT, [], env, Path(temp_dir) / "head.out")
        procs.append(head)
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                pytest.fail(f"start_ray_head.sh exited {head.returncode}:\n{(Path(temp_dir) / 'head.out').read_text()}")
            try:
                JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        (worker_agent_port,) = _free_ports(1)
        worker_env = {**_node_env(temp_dir, token, worker_agent_port), "ERC_NUM_CPUS": "1"}
        procs.append(_start(WORKER_SCRIPT, [f"127.0.0.1:{gcs_port}"], worker_env, Path(temp_dir) / "worker.out"))
        yield Cluster(address=address, gcs=f"127.0.0.1:{gcs_port}", token=token, temp_dir=temp_dir)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_id(stdout: str) -> str:
    m = re.search(r"^(raysubmit_\w+)$", stdout, re.MULTILINE)
    assert m, f"no job id in:\n{stdout}"
    return m.group(1)


def test_smoke_job_follows_to_success_and_its_logs_are_readable(cli, cluster):
    # Waits for the worker node, then checks verl has the ERC losses on both nodes.
    r = cli("submit", "--smoke", "--follow", "--", "--min-nodes", "2", "--wait", "90")
    assert r.returncode == 0, r.stdout + r.stderr + (Path(cluster.temp_dir) / "worker.out").read_text()
    job = _job_id(r.stdout)
    assert "erc-verl smoke OK: 2 node(s)" in r.stdout
    # Each node imported the uploaded checkout (Ray's working_dir), not the installed copy.
    nodes = re.findall(r"^node .*: erc_verl from (\S+);", r.stdout, re.MULTILINE)
    assert len(nodes) == 2 and all("working_dir_files" in path for path in nodes), r.stdout
    assert f"job {job} SUCCEEDED" in r.stderr

    status = cli("jobs", "status", job)
    assert status.returncode == 0, status.stderr
    assert f"{job}: SUCCEEDED" in status.stdout
    assert "erc_verl_recipe=smoke" in status.stdout
    assert "python -m erc_verl.runs.smoke" in status.stdout

    logs = cli("jobs", "logs", job)
    assert logs.returncode == 0, logs.stderr
    assert "erc-verl smoke OK" in logs.stdout

    listed = cli("jobs", "list")
    assert re.search(rf"^{job}\tSUCCEEDED\tsmoke\t", listed.stdout, re.MULTILINE), listed.stdout


def test_failing_job_exits_nonzero_with_its_reason(cli, cluster):
    r = cli("submit", "--smoke", "--follow", "--", "--min-nodes", "5")
    assert r.returncode == 1, r.stdout + r.stderr
    job = _job_id(r.stdout)
    assert re.search(r"smoke FAILED: the cluster has [12] node\(s\)", r.stdout), r.stdout  # the job's stderr
    assert re.search(rf"job {job} FAILED: .*exit code 1", r.stderr), r.stderr

    status = cli("jobs", "status", job)
    assert f"{job}: FAILED" in status.stdout and "exit code 1" in status.stdout
    # Following an ended job replays its logs and exits with its status, also as a process: the
    # installed `erc-verl` script with the token in RAY_AUTH_TOKEN.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    again = subprocess.run(
        [str(Path(VENV_BIN) / "erc-verl"), "jobs", "logs", job, "--follow", "--address", cluster.address],
        env={**env, "RAY_AUTH_TOKEN": cluster.token},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1, again.stderr
    assert "wanted at least 5 node(s)" in again.stdout and f"job {job} FAILED" in again.stderr


def test_stop_a_running_job(cli, cluster):
    # A CPU-only cluster never shows a GPU: the smoke check waits, i.e. the job stays RUNNING until stopped.
    r = cli("submit", "--smoke", "--", "--min-gpus", "1", "--wait", "600")
    assert r.returncode == 0, r.stderr
    job = _job_id(r.stdout)
    assert f"jobs logs {job} --follow" in r.stderr

    deadline = time.monotonic() + 60
    while f"{job}: RUNNING" not in (status := cli("jobs", "status", job)).stdout:
        assert time.monotonic() < deadline, status.stdout + status.stderr
        time.sleep(1)

    stop = cli("jobs", "stop", job)
    assert stop.returncode == 0, stop.stderr
    assert f"job {job}: STOPPED" in stop.stdout
    assert f"{job}: STOPPED" in cli("jobs", "status", job).stdout
    followed = cli("jobs", "logs", job, "--follow")
    assert followed.returncode == 1 and f"job {job} STOPPED" in followed.stderr
    # Stopping it again is not an error, and says so.
    assert "was not running (STOPPED)" in cli("jobs", "stop", job).stdout


def test_missing_or_wrong_token_says_what_to_set(cli, cluster):
    r = cli("jobs", "list", token=None)
    assert r.returncode == 3
    assert (
        "requires an auth token" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr and "ray get-auth-token" in r.stderr
    )

    r = cli("jobs", "list", token="0" * 64)
    assert r.returncode == 3
    assert "rejected the auth token" in r.stderr and "Invalid authentication token" in r.stderr


def test_unknown_job_id(cli, cluster):
    for cmd in (("jobs", "status", "raysubmit_nope"), ("jobs", "logs", "raysubmit_nope", "--follow")):
        r = cli(*cmd)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "no job 'raysubmit_nope'" in r.stderr


def test_gcs_port_instead_of_dashboard_port(cli, cluster):
    r = cli("jobs", "list", address=f"http://{cluster.gcs}")
    assert r.returncode == 3
    assert "dashboard port" in r.stderr


def test_worker_script_without_token_fails_before_starting_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    r = subprocess.run(["bash", str(WORKER_SCRIPT), "127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "no token" in r.stderr and "ray get-auth-token" in r.stderr


def test_recipe_job_gets_its_overrides_through(cli, cluster):
    """The real entry point: `python -m erc_verl train <recipe> [overrides]` on the cluster. Hydra's `--cfg job`
    composes the recipe and prints it instead of training, so the override is visible in the job's logs."""
    from erc_verl.runs.recipes import available

    recipe = next(iter(available(REPO_ROOT / "recipes")))
    r = cli("submit", recipe, "trainer.experiment_name=from submit", "--follow", "--", "--cfg", "job")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "experiment_name: from submit" in r.stdout
    job = _job_id(r.stdout)
    status = cli("jobs", "status", job)
    assert f"erc_verl_recipe={recipe}" in status.stdout
    assert f"python -m erc_verl train {recipe} 'trainer.experiment_name=from submit' --cfg job" in status.stdout


@pytest.mark.e2e
def test_slurm_template_starts_ray_and_runs_a_recipe(tmp_path):
    """launch/slurm_erc.sbatch on a one-node "allocation": srun and scontrol are stand-ins that run the step
    here. The template starts the head, runs the smoke check, submits the recipe (with `--cfg job`: compose
    and print, no training) and tears Ray down at exit."""
    from erc_verl.runs.recipes import available

    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(
        "#!/usr/bin/env bash\n# srun stand-in: drop the options, run the step here.\n"
        'while [ $# -gt 0 ]; do case "$1" in -w) shift 2 ;; -*) shift ;; *) break ;; esac; done\nexec "$@"\n'
    )
    (shims / "scontrol").write_text('#!/usr/bin/env bash\necho "$(hostname)"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    temp_dir = tempfile.mkdtemp(prefix="ercslurm_", dir="/tmp")
    gcs_port, dash_port, client_port, agent_port = _free_ports(4)
    token_path = tmp_path / "token"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ERC_", "SLURM_"))}
    env.update(
        PATH=f"{shims}:{VENV_BIN}:{env.get('PATH', '')}",
        HOME=str(tmp_path),
        SLURM_JOB_NODELIST="node0",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(REPO_ROOT),
        RAY_AUTH_TOKEN_PATH=str(token_path),
        ERC_HEAD_IP="127.0.0.1",
        ERC_GPUS_PER_NODE="0",
        ERC_NUM_CPUS="2",
        ERC_RAY_PORT=str(gcs_port),
        ERC_DASHBOARD_PORT=str(dash_port),
        ERC_DASHBOARD_HOST="127.0.0.1",
        ERC_CLIENT_PORT=str(client_port),
        ERC_AGENT_PORT=str(agent_port),
        ERC_RAY_TEMP_DIR=temp_dir,
        ERC_WAIT_S="120",
    )
    recipe = next(iter(available(REPO_ROOT / "recipes")))
    log = tmp_path / "slurm.out"
    leftovers = False
    try:
        with open(log, "w") as out_file:  # a file, not a pipe: a leftover Ray process must not block the test
            proc = subprocess.Popen(
                ["bash", str(REPO_ROOT / "launch" / "slurm_erc.sbatch"), recipe, "--cfg", "job"],
                env=env,
                stdout=out_file,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
            returncode = proc.wait(timeout=420)
        # Ray's node processes finish shutting down a moment after `ray start` returns; then none may be left.
        deadline = time.monotonic() + 30
        while not leftovers:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            leftovers = time.monotonic() > deadline
            time.sleep(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    out = log.read_text()
    assert returncode == 0, out
    assert not leftovers, "the template left Ray processes running:\n" + out
    assert "erc-verl smoke OK: 1 node(s), 0 GPU(s)" in out
    # The template added the allocation's shape to the overrides.
    assert re.search(r"^\s+nnodes: 1$", out, re.MULTILINE), out
    assert re.search(r"^\s+n_gpus_per_node: 0$", out, re.MULTILINE), out
    assert f"run of {recipe} ended with exit code 0" in out
    assert not token_path.exists(), "the per-job token is removed at the end"
    # Ray was torn down: nothing listens on the head's ports any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", dash_port), timeout=2).close()
