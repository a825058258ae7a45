"""`erc-verl submit` / `jobs` against a real two-node Ray 2.60 cluster on loopback: a head started by
launch/start_ray_head.sh and a worker node joined by launch/start_ray_worker.sh, one logical GPU each (the CPU
platform's workers), token authentication on.

The nodes have their own temp dirs and free ports (other Ray clusters may run on this machine at the same time),
and every process they started is gone when the module ends. One cluster serves every test: the smoke check, the
job commands, and a two-step ERC run on both nodes through `submit --follow` that loses the worker node in the
middle, fails, and, resubmitted once the node is back, resumes from its checkpoint on the shared path and finishes.
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
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from erc_verl.runs import metrics as metrics_log
from tests import REPO_ROOT

pytestmark = pytest.mark.e2e  # real Ray clusters and training runs: part of the full suite, not the fast loop

HEAD_SCRIPT = REPO_ROOT / "launch" / "start_ray_head.sh"
WORKER_SCRIPT = REPO_ROOT / "launch" / "start_ray_worker.sh"
VENV_BIN = str(Path(sys.executable).parent)
CLUSTER_MARK = "ERC_VERL_TEST_NODE"  # in each node's environment: every process the node starts is found again
CACHE = os.environ.get("ERC_VERL_CACHE", str(REPO_ROOT / ".cache" / "erc_verl"))  # absolute: both nodes see it
RECIPE = "cpu_tiny_erc_dapo"
# The CPU recipe on both nodes, as short as a run can be: two steps of 4 prompts x 4 samples (8 per rank), no
# validation, a checkpoint after every step, resumed when one is there.
TRAIN = [
    "trainer.nnodes=2", "trainer.n_gpus_per_node=1", "trainer.total_training_steps=2",
    "data.train_batch_size=4", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "algorithm.filter_groups.enable=false", "trainer.val_before_train=false", "trainer.test_freq=-1",
    "trainer.save_freq=1", "trainer.resume_mode=auto",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start(script: Path, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["bash", str(script), *args, "--object-store-memory", str(100 * 2**20)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Cluster:
    address: str
    gcs: str
    token: str
    temp_dir: Path
    node_env: dict
    procs: dict = field(default_factory=dict)

    def start_worker(self) -> None:
        (agent_port,) = _free_ports(1)
        env = {**self.node_env, "ERC_RAY_TEMP_DIR": str(self.temp_dir / "worker"), "ERC_AGENT_PORT": str(agent_port),
               CLUSTER_MARK: str(self.temp_dir / "worker")}
        self.procs["worker"] = _start(WORKER_SCRIPT, [self.gcs], env, self.temp_dir / "worker.out")

    def lose_worker(self) -> None:
        """The worker node dies at once, as when its machine fails: SIGKILL to every process it runs."""
        for proc in self.processes(self.temp_dir / "worker"):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.procs.pop("worker").wait(timeout=60)

    def processes(self, node_dir: Path | None = None) -> list[psutil.Process]:
        """The processes of a node (default: of both), jobs' drivers and workers included: they inherit the node's
        environment (Ray renames its workers' command lines, and job drivers run in sessions of their own)."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                mark = proc.environ().get(CLUSTER_MARK, "")
                if mark == str(node_dir) or (node_dir is None and mark.startswith(f"{self.temp_dir}/")):
                    found.append(proc)
        return found


@pytest.fixture(scope="module")
def cluster():
    # Short path: Ray's unix sockets live under it and must stay under 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ercsub_", dir="/tmp"))
    token = secrets.token_hex(32)
    gcs_port, dash_port, client_port, agent_port = _free_ports(4)
    node_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ERC_"))}
    # Logical CPUs, the same on both nodes: verl's actor bundle (3 CPUs + the GPU) must fit next to its helper
    # actors (TaskRunner, TransferQueue, reward and agent loop workers) on whichever node those land.
    node_env.update(
        # `python` in the job entrypoint and `ray` in the scripts must be this environment's.
        PATH=f"{VENV_BIN}:{node_env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
        ERC_NODE_IP="127.0.0.1", ERC_NUM_GPUS="1", ERC_NUM_CPUS="8",
    )
    head_env = {**node_env, "ERC_RAY_PORT": str(gcs_port), "ERC_DASHBOARD_PORT": str(dash_port),
                "ERC_DASHBOARD_HOST": "127.0.0.1", "ERC_CLIENT_PORT": str(client_port),
                "ERC_AGENT_PORT": str(agent_port), "ERC_RAY_TEMP_DIR": str(temp_dir / "head"),
                CLUSTER_MARK: str(temp_dir / "head")}
    c = Cluster(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", token, temp_dir, node_env)
    try:
        c.procs["head"] = _start(HEAD_SCRIPT, [], head_env, temp_dir / "head.out")
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            if c.procs["head"].poll() is not None:
                pytest.fail(f"start_ray_head.sh exited:\n{(temp_dir / 'head.out').read_text()}")
            try:
                JobSubmissionClient(c.address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        c.start_worker()
        yield c
    finally:
        for name in ("worker", "head"):
            if name in c.procs:
                _stop(c.procs.pop(name))
        deadline = time.monotonic() + 30  # the last of a node's processes exit a moment after `ray start` does
        while (left := c.processes()) and time.monotonic() < deadline:
            time.sleep(1)
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"the cluster left processes behind: {[p.info['cmdline'][:3] for p in left]}"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def client_token(cluster, tmp_path_factory):
    """This process (`erc-verl ...` in it, Ray's state API) holds the cluster's token in a file, found by Ray's own
    loader; the token file of another cluster is never read."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    home = tmp_path_factory.mktemp("client")
    (home / "token").write_text(cluster.token)
    with pytest.MonkeyPatch.context() as env:
        for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.delenv(var, raising=False)
        env.setenv("HOME", str(home))  # no ~/.ray/auth_token of another test run
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN_PATH", str(home / "token"))
        reset_auth_token_state()  # Ray reads the token once per process
        yield home
    reset_auth_token_state()


@pytest.fixture
def cli(cluster, client_token, capsys, monkeypatch):
    """`erc-verl ...` in this process, with the cluster's token (default), another one, or none."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    from erc_verl import cli as erc_cli

    def run(*args: str, token: str | None = cluster.token, address: str | None = None) -> Result:
        args = list(args)
        # Connection flags go before any `--`, after which arguments belong to the job.
        at = args.index("--") if "--" in args else len(args)
        args[at:at] = ["--address", address or cluster.address]
        with monkeypatch.context() as env:
            if token is None:
                env.delenv("RAY_AUTH_MODE")
                env.delenv("RAY_AUTH_TOKEN_PATH")
            elif token != cluster.token:
                (client_token / "other_token").write_text(token)
                env.setenv("RAY_AUTH_TOKEN_PATH", str(client_token / "other_token"))
            reset_auth_token_state()
            capsys.readouterr()
            rc = erc_cli.main(args)
            out = capsys.readouterr()
        reset_auth_token_state()
        return Result(rc, out.out, out.err)

    return run


def _job_id(stdout: str) -> str:
    m = re.search(r"^(raysubmit_\w+)$", stdout, re.MULTILINE)
    assert m, f"no job id in:\n{stdout}"
    return m.group(1)


def _job_info(cluster, job: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"}).get_job_info(job)


def test_smoke_job_follows_to_success_and_its_logs_are_readable(cli, cluster):
    # Waits for the worker node, then checks verl has the ERC losses on both nodes, and what CUDA sees.
    r = cli("submit", "--smoke", "--follow", "--", "--min-nodes", "2", "--min-gpus", "2", "--wait", "120")
    assert r.returncode == 0, r.stdout + r.stderr + (cluster.temp_dir / "worker.out").read_text()
    job = _job_id(r.stdout)
    assert "erc-verl smoke OK: 2 node(s), 2 GPU(s)" in r.stdout
    # Each node imported the uploaded checkout (Ray's working_dir), not the installed copy.
    nodes = re.findall(r"^node .*: erc_verl from (\S+);", r.stdout, re.MULTILINE)
    assert len(nodes) == 2 and all("working_dir_files" in path for path in nodes), r.stdout
    # A task holding each node's GPU ran there; torch here is the CPU build, so the CUDA count is skipped, saying so
    assert r.stdout.count("1 GPU(s) in Ray; CUDA check skipped: torch is a CPU build") == 2, r.stdout
    assert f"job {job} SUCCEEDED" in r.stderr

    info = _job_info(cluster, job)
    assert info.metadata["erc_verl_recipe"] == "smoke" and "python -m erc_verl.runs.smoke" in info.entrypoint
    status = cli("jobs", "status", job)
    assert status.returncode == 0, status.stderr
    assert f"Job '{job}' succeeded" in status.stdout

    logs = cli("jobs", "logs", job)
    assert logs.returncode == 0, logs.stderr
    assert "erc-verl smoke OK" in logs.stdout

    listed = cli("jobs", "list")  # Ray's listing: every job with its status and metadata
    listing = rf"submission_id='{job}'.*?status=<JobStatus.SUCCEEDED.*?'erc_verl_recipe': 'smoke'"
    assert re.search(listing, listed.stdout, re.DOTALL), listed.stdout


def test_failing_job_exits_nonzero_with_its_reason(cli, cluster):
    r = cli("submit", "--smoke", "--follow", "--", "--min-nodes", "5")
    assert r.returncode == 1, r.stdout + r.stderr
    job = _job_id(r.stdout)
    assert re.search(r"smoke FAILED: the cluster has [12] node\(s\)", r.stdout), r.stdout  # the job's stderr
    assert re.search(rf"job {job} FAILED: .*exit code 1", r.stderr), r.stderr

    status = cli("jobs", "status", job)
    assert f"Job '{job}' failed" in status.stdout and "exit code 1" in status.stdout
    # Following an ended job replays its logs and exits with its status, also as a process: the installed
    # `erc-verl` script with the token in a file given by flag.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    token_file = cluster.temp_dir / "client.token"
    token_file.write_text(cluster.token)
    again = subprocess.run(
        [str(Path(VENV_BIN) / "erc-verl"), "jobs", "logs", job, "--follow", "--address", cluster.address,
         "--auth-token-file", str(token_file)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 1, again.stderr
    assert "wanted at least 5 node(s)" in again.stdout and f"job {job} FAILED" in again.stderr


def test_stop_a_running_job(cli, cluster):
    # The cluster never shows 5 GPUs: the smoke check waits, i.e. the job stays RUNNING until stopped.
    r = cli("submit", "--smoke", "--", "--min-gpus", "5", "--wait", "600")
    assert r.returncode == 0, r.stderr
    job = _job_id(r.stdout)
    assert f"jobs logs {job} --follow" in r.stderr

    deadline = time.monotonic() + 60
    while f"Status for job '{job}': RUNNING" not in (status := cli("jobs", "status", job)).stdout:
        assert time.monotonic() < deadline, status.stdout + status.stderr
        time.sleep(1)

    stop = cli("jobs", "stop", job)
    assert stop.returncode == 0, stop.stderr
    assert f"Job '{job}' was stopped" in stop.stdout  # Ray's, once the job has ended
    assert f"Job '{job}' was stopped" in cli("jobs", "status", job).stdout
    followed = cli("jobs", "logs", job, "--follow")
    assert followed.returncode == 1 and f"job {job} STOPPED" in followed.stderr
    # Stopping it again is not an error, and says so.
    again = cli("jobs", "stop", job)
    assert again.returncode == 0 and f"Job '{job}' was stopped" in again.stdout


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


def _submit_train(run_dir: Path) -> list[str]:
    return ["submit", RECIPE, "--follow", "--env", f"ERC_VERL_CACHE={CACHE}", "--env", f"ERC_VERL_RUN_DIR={run_dir}",
            *TRAIN]


def _worker_actor_nodes(cluster, job: str) -> set[str]:
    """The nodes verl's actor workers (`WorkerDict` actors) of a job ran on, from Ray's state API."""
    from ray.util.state import list_actors

    job_hex = _job_info(cluster, job).job_id
    actors = list_actors(address=cluster.address, filters=[("job_id", "=", job_hex)], detail=True, limit=1000)
    nodes = {a.node_id for a in actors if a.class_name.endswith("WorkerDict")}
    assert nodes, f"no WorkerDict actor of job {job} ({job_hex}) among {[(a.class_name, a.job_id) for a in actors]}"
    return nodes


def _alive_nodes(cluster, other_than: set[str] = frozenset()) -> set[str]:
    """The two alive nodes, once both have joined and, after a node was lost, once Ray has found it dead (it does
    by missed health checks) and its replacement joined: not the set `other_than`."""
    from ray.util.state import list_nodes

    deadline = time.monotonic() + 120
    while True:
        # Unfiltered: the state API counts a filtered-out dead node as data it could not return.
        alive = {n.node_id for n in list_nodes(address=cluster.address, limit=100) if n.state == "ALIVE"}
        if len(alive) == 2 and alive != other_than:
            return alive
        assert time.monotonic() < deadline, f"alive after 120s: {alive}"
        time.sleep(1)


@pytest.fixture(scope="module")
def run_dir(cluster):
    """The run's directory, shared by both nodes as a shared file system would be: an absolute path."""
    return cluster.temp_dir / "run"


@pytest.fixture(scope="module")
def lost_run(cluster, client_token, run_dir):
    """A two-step run, `erc-verl submit --follow` as a user runs it (a process), that loses the worker node in the
    middle of step 2, once step 1's checkpoint and metrics are on the shared path. Returns the job id, the exit
    code and the output."""
    before = _alive_nodes(cluster)
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token, PYTHONUNBUFFERED="1")
    cmd = [str(Path(VENV_BIN) / "erc-verl"), *_submit_train(run_dir), "--address", cluster.address]
    log = cluster.temp_dir / "lost.out"
    with open(log, "w") as out:
        follow = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        # verl logs a step's metrics after saving its checkpoint: then step 2 starts
        while not (tracker.is_file() and tracker.read_text().strip() == "1"
                   and any(row["step"] == 1 for row in metrics_log.read_rows(str(run_dir / "metrics.jsonl.attempt")))):
            assert follow.poll() is None, log.read_text()[-8000:]
            assert time.monotonic() < deadline, "no checkpoint of step 1 in 10 minutes"
            time.sleep(0.5)
        cluster.lose_worker()
        try:
            rc = follow.wait(timeout=600)
        except subprocess.TimeoutExpired:  # show where the job (or its log stream) hung, not just the timeout
            follow.kill()
            follow.wait()
            pytest.fail(f"no end of the job in 10 minutes after losing the worker node; its output:\n"
                        f"{log.read_text()[-8000:]}")
    cluster.start_worker()
    _alive_nodes(cluster, other_than=before)  # the replacement has joined before the next run places its workers
    text = log.read_text()
    return _job_id(text), rc, text


def test_losing_a_node_mid_run_fails_the_job_with_its_reason(cli, cluster, run_dir, lost_run):
    job, rc, out = lost_run
    assert rc == 1, out[-8000:]
    assert "joining its cluster" in out  # not a second Ray instance of its own (`address: local`)
    assert re.search(rf"^job {job} FAILED: \S", out, re.MULTILINE), out[-8000:]
    status = cli("jobs", "status", job)
    assert f"Job '{job}' failed" in status.stdout, status.stdout
    # What the run had finished is on the shared path.
    assert (run_dir / "checkpoints" / "global_step_1").is_dir()
    assert not (run_dir / "checkpoints" / "global_step_2").exists()


def test_a_resubmitted_run_resumes_on_both_nodes_and_finishes(cli, cluster, run_dir, lost_run):
    """The same command again: trains through `submit --follow` to success, from the lost run's checkpoint, with
    an actor rank on each node."""
    step_1 = run_dir / "checkpoints" / "global_step_1"
    saved = {path: path.stat().st_mtime_ns for path in step_1.rglob("*") if path.is_file()}
    r = cli(*_submit_train(run_dir))
    assert r.returncode == 0, (r.stdout + r.stderr)[-8000:]
    job = _job_id(r.stdout)
    assert f"job {job} SUCCEEDED" in r.stderr
    assert "joining its cluster" in r.stdout
    # Loaded, not trained again (a run from scratch would save step 1 anew).
    assert saved and {path: path.stat().st_mtime_ns for path in saved} == saved
    assert _worker_actor_nodes(cluster, job) == _alive_nodes(cluster)  # rank 0 on one node, rank 1 on the other
    info = _job_info(cluster, job)
    assert info.metadata["erc_verl_recipe"] == RECIPE and "trainer.nnodes=2" in info.entrypoint
    assert (run_dir / "checkpoints" / "global_step_2").is_dir()
    rows = metrics_log.read_steps(str(run_dir / "metrics.jsonl"))
    assert [step for step, _ in rows] == [1, 2] and all("actor/erc_clipfrac" in m for _, m in rows), rows


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
    assert "erc-verl smoke OK: 1 node(s), 0 GPU(s)" in out and "no node advertises GPUs: CUDA check skipped" in out
    # The template added the allocation's shape to the overrides.
    assert re.search(r"^\s+nnodes: 1$", out, re.MULTILINE), out
    assert re.search(r"^\s+n_gpus_per_node: 0$", out, re.MULTILINE), out
    assert f"run of {recipe} ended with exit code 0" in out
    assert not token_path.exists(), "the per-job token is removed at the end"
    # Ray was torn down: nothing listens on the head's ports any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", dash_port), timeout=2).close()
