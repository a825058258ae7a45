"""`erc-verl submit` and `erc-verl jobs`: run recipes on a Ray cluster through Ray's job API.

    erc-verl submit <recipe> [overrides...] --address http://HEAD:8265 [--follow]
    erc-verl submit --smoke --address http://HEAD:8265 --follow [-- --min-gpus 64]
    erc-verl jobs status|logs|stop|list [<id>] --address http://HEAD:8265

The job runs `python -m erc_verl train <recipe> [overrides...]` on the head. How the code gets there:
the repository root is the job's `working_dir` (Ray zips and uploads it, minus checkpoints, data and
caches), and Ray puts that directory first on the PYTHONPATH of the driver and of every worker, so the
erc_verl you submit is the one that runs, edits included. Dependencies (verl, torch, vLLM, math-verify)
are not installed per job: the nodes run the GPU image from docker/ (or any environment where
`pip install erc-verl` was done). VERL_USE_EXTERNAL_MODULES=erc_verl.plugin makes every `import verl` on
the cluster load the plugin even where erc-verl's entry point is not installed.

Exit codes: 0 success (job SUCCEEDED when following); 1 the job FAILED or was STOPPED; 2 usage error
(unknown recipe, malformed address, unknown job id); 3 the cluster is unreachable or refused the token;
130 interrupted while following (the job keeps running).
"""

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import erc_verl
from erc_verl.runs import recipes

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_CLUSTER = 3
EXIT_INTERRUPTED = 130

TRAIN_MODULE = "erc_verl"  # python -m erc_verl train RECIPE ...
SMOKE_MODULE = "erc_verl.runs.smoke"

# Never uploaded: Ray caps a working_dir package at a few hundred MiB, and checkpoints, data and
# environments belong on the cluster's shared storage, not in every job's package.
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    ".cache",
    ".pytest_cache",
    ".hypothesis",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    "outputs",
    "runs",
    "multirun",
    "checkpoints",
    "wandb",
    "bench/results",
    "*.parquet",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.whl",
]

# Per-job environment. Node-level settings (NCCL, network interfaces) come from launch/start_ray_*.sh.
BASE_ENV_VARS = {
    "PYTHONUNBUFFERED": "1",  # logs reach `--follow` as they are written
    "VERL_USE_EXTERNAL_MODULES": "erc_verl.plugin",
}

AUTH_HELP = (
    "Ray 2.60 clusters require a token on the job API. On the submitting machine set RAY_AUTH_MODE=token and "
    "put the head's token in ~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or pass "
    "--auth-token-file PATH. Print the token on the head node with `ray get-auth-token`."
)


class SubmitError(Exception):
    """A failure with a message for the user and the exit code to return."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- address, auth


def resolve_address(address: str | None, environ=os.environ) -> str:
    """The job API URL from --address, RAY_API_SERVER_ADDRESS or RAY_ADDRESS; must be http(s)://host:port."""
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / job API of the head node) "
            "or set RAY_API_SERVER_ADDRESS",
            EXIT_USAGE,
        )
    parsed = urlparse(address)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        raise SubmitError(
            f"bad cluster address {address!r}: expected http://HEAD:PORT, the head's dashboard / job API "
            "(port 8265 unless the head was started with another --dashboard-port), e.g. http://10.0.0.1:8265",
            EXIT_USAGE,
        )
    return address.rstrip("/")


def resolve_auth_token(token: str | None, token_file: str | None, environ=os.environ) -> str | None:
    """The token to send, in Ray's own order of sources; None when nothing asks for token auth."""
    if token:
        return token.strip()
    path = token_file or environ.get("RAY_AUTH_TOKEN_PATH")
    if not path and environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip()
    if not path and environ.get("RAY_AUTH_MODE", "").lower() == "token":
        path = str(Path.home() / ".ray" / "auth_token")
    if not path:
        return None
    try:
        value = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise SubmitError(f"cannot read the Ray auth token from {path}: {e.strerror}. {AUTH_HELP}", EXIT_CLUSTER)
    if not value:
        raise SubmitError(f"the Ray auth token file {path} is empty. {AUTH_HELP}", EXIT_CLUSTER)
    return value


def _check_reachable(address: str, timeout_s: float) -> None:
    """A bounded TCP connect first: requests would otherwise hang for minutes on a firewalled host."""
    parsed = urlparse(address)
    host, port = parsed.hostname, parsed.port
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except socket.gaierror:
        raise SubmitError(f"cannot resolve the head's host name {host!r} (from {address})", EXIT_CLUSTER)
    except TimeoutError:
        raise SubmitError(
            f"timed out after {timeout_s:g}s connecting to {host}:{port}: the head is down or a firewall drops "
            f"the port; from outside the cluster tunnel it: ssh -L {port}:localhost:{port} HEAD",
            EXIT_CLUSTER,
        )
    except OSError as e:
        raise SubmitError(
            f"cannot reach the Ray head at {address}: {e.strerror or e}. Is Ray running there "
            "(launch/start_ray_head.sh) with its dashboard on that port?",
            EXIT_CLUSTER,
        )


def _check_job_api(address: str, headers: dict | None, timeout_s: float) -> None:
    """GET /api/version with a timeout (the SDK's own check has none, and e.g. the GCS port never answers HTTP)."""
    import requests

    hint = "Give the dashboard port of the head (default 8265), not the GCS port (6379)."
    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=timeout_s)
        if r.status_code in (401, 403):
            problem = "requires an auth token" if r.status_code == 401 and not headers else "rejected the auth token"
            raise SubmitError(f"the Ray cluster at {address} {problem} ({r.text.strip()}). {AUTH_HELP}", EXIT_CLUSTER)
        version = r.json()["ray_version"] if r.status_code == 200 else None
    except requests.exceptions.Timeout:
        raise SubmitError(
            f"{address} accepted the connection but sent no HTTP answer in {timeout_s:g}s. {hint}", EXIT_CLUSTER
        )
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError) as e:
        raise SubmitError(f"{address} is not a Ray job API ({type(e).__name__}: {e}). {hint}", EXIT_CLUSTER)
    if version is None:
        raise SubmitError(
            f"{address} is not a Ray job API (GET /api/version: HTTP {r.status_code}). {hint}", EXIT_CLUSTER
        )


@contextlib.contextmanager
def _cluster_errors(address: str, job_id: str | None = None):
    """Turn the job SDK's exceptions into messages that say what to do."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        head = str(e).split("\n", 1)[0]
        raise SubmitError(f"the Ray cluster at {address} refused the request ({head}). {AUTH_HELP}", EXIT_CLUSTER)
    except (ConnectionError, requests.exceptions.RequestException) as e:
        raise SubmitError(
            f"{address} does not answer as a Ray job API ({e}). Give the dashboard port of the head "
            "(default 8265), not the GCS port (6379).",
            EXIT_CLUSTER,
        )
    except RuntimeError as e:
        text = str(e)
        if "404" in text and job_id is not None:
            raise SubmitError(f"no job {job_id!r} on the cluster at {address}", EXIT_USAGE)
        if "404" in text:
            raise SubmitError(
                f"{address} answered but is not a Ray job API ({text.strip()}). Give the dashboard port of the "
                "head (default 8265).",
                EXIT_CLUSTER,
            )
        raise SubmitError(f"the Ray job API at {address} returned an error: {text.strip()}", EXIT_CLUSTER)


def connect(address: str | None, token: str | None = None, token_file: str | None = None, timeout_s: float = 10.0):
    """A JobSubmissionClient for the head, with the auth token as a Bearer header when there is one."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token = resolve_auth_token(token, token_file)
    _check_reachable(address, timeout_s)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    _check_job_api(address, headers, timeout_s)
    with _cluster_errors(address):
        return JobSubmissionClient(address, headers=headers), address


# ------------------------------------------------------------------------------------------ recipe, job spec


def resolve_recipe(recipe: str, working_dir: Path) -> str:
    """The recipe name, checked against the checkout's recipes here so that a typo fails in a second, not after
    the upload and the cluster's start-up."""
    try:
        return recipes.resolve(recipe, working_dir / "recipes")
    except recipes.RecipeError as err:
        raise SubmitError(str(err), EXIT_USAGE) from None


def check_working_dir(working_dir: Path) -> Path:
    """The upload must be an erc-verl checkout, never e.g. site-packages of a non-editable install."""
    working_dir = working_dir.resolve()
    pyproject = working_dir / "pyproject.toml"
    if not (working_dir / "erc_verl" / "__init__.py").is_file() or not pyproject.is_file():
        raise SubmitError(
            f"{working_dir} is not an erc-verl checkout (no pyproject.toml and erc_verl/): run from the repository "
            "or pass --working-dir",
            EXIT_USAGE,
        )
    if not re.search(r'^name\s*=\s*"erc-verl"', pyproject.read_text(), re.MULTILINE):
        raise SubmitError(f"{pyproject} is not erc-verl's; pass --working-dir", EXIT_USAGE)
    return working_dir


def build_entrypoint(module: str, args: list[str]) -> str:
    """`python -m <module> args...`, quoted for the shell the job supervisor runs it in."""
    return shlex.join(["python", "-m", module, *args])


def parse_env(pairs: list[str], environ=os.environ) -> dict[str, str]:
    """`--env KEY=VALUE`, or `--env KEY` to forward the local value (e.g. WANDB_API_KEY)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            raise SubmitError(f"bad --env {pair!r}: expected KEY=VALUE or KEY", EXIT_USAGE)
        if not sep:
            if key not in environ:
                raise SubmitError(f"--env {key}: {key} is not set in this environment", EXIT_USAGE)
            value = environ[key]
        out[key] = value
    return out


def build_runtime_env(working_dir: Path, extra_env: dict[str, str]) -> dict:
    env_vars = dict(BASE_ENV_VARS)
    if "VERL_USE_EXTERNAL_MODULES" in extra_env:
        # Keep the plugin alongside the user's own modules.
        mods = [m for m in extra_env.pop("VERL_USE_EXTERNAL_MODULES").split(",") if m]
        env_vars["VERL_USE_EXTERNAL_MODULES"] = ",".join(
            dict.fromkeys([BASE_ENV_VARS["VERL_USE_EXTERNAL_MODULES"], *mods])
        )
    env_vars.update(extra_env)
    return {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env_vars}


def _git_commit(working_dir: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(working_dir), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------------------- follow


def _terminal_status(client, job_id: str, timeout_s: float = 30.0):
    """The job's final JobInfo; the log stream can close a moment before the status turns terminal."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or time.monotonic() >= deadline:
            return info
        time.sleep(0.5)


def follow(client, address: str, job_id: str, out=None) -> int:
    """Stream the job's logs until it ends; return the exit code its final status maps to."""
    import aiohttp
    from ray.job_submission import JobStatus

    out = out or sys.stdout

    async def stream():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        with _cluster_errors(address, job_id):
            client.get_job_info(job_id)  # an unknown id fails here with a clear message, not in the websocket
            try:
                asyncio.run(stream())
            except (RuntimeError, aiohttp.ClientError) as e:
                # The log websocket dropped (head restarted, network): the job itself may be fine.
                raise SubmitError(
                    f"lost the log stream of job {job_id} ({e}); it may still be running: "
                    f"erc-verl jobs status {job_id} --address {address}",
                    EXIT_CLUSTER,
                )
            info = _terminal_status(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} keeps running. Stop it with: erc-verl jobs stop {job_id} "
            f"--address {address}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if info.status == JobStatus.SUCCEEDED:
        print(f"job {job_id} SUCCEEDED", file=sys.stderr)
        return EXIT_OK
    reason = _failure_reason(info)
    print(f"job {job_id} {info.status}{': ' + reason if reason else ''}", file=sys.stderr)
    return EXIT_JOB_FAILED


def _failure_reason(info) -> str:
    """The first line of Ray's message (the rest repeats the log tail already streamed) plus the exit code."""
    first = (info.message or "").strip().split("\n", 1)[0].rstrip(":")
    code = getattr(info, "driver_exit_code", None)
    if code is not None and str(code) not in first:
        first = f"{first} (driver exit code {code})" if first else f"driver exit code {code}"
    return first


# ------------------------------------------------------------------------------------------------ commands


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster connection")
    g.add_argument(
        "--address",
        help="job API of the head, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)",
    )
    g.add_argument("--auth-token-file", help="file holding the cluster's token (default: Ray's own sources)")
    g.add_argument(
        "--auth-token",
        help="the token itself (visible in `ps`; prefer --auth-token-file, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)",
    )
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the head (default 10)")


def _connect(args):
    return connect(args.address, args.auth_token, args.auth_token_file, args.connect_timeout)


def _run(fn, args) -> int:
    try:
        return fn(args)
    except SubmitError as e:
        print(f"erc-verl: {e}", file=sys.stderr)
        return e.code


def _submit(args) -> int:
    working_dir = check_working_dir(Path(args.working_dir) if args.working_dir else recipes.CHECKOUT_DIR)
    metadata = {"erc_verl_version": erc_verl.__version__}
    if args.smoke:
        entrypoint = build_entrypoint(SMOKE_MODULE, args.args)
        metadata["erc_verl_recipe"] = "smoke"
    else:
        if not args.args:
            available = ", ".join(recipes.available(working_dir / "recipes")) or "(none)"
            raise SubmitError(
                f"which recipe? usage: erc-verl submit <recipe> [overrides...]; available: {available}", EXIT_USAGE
            )
        recipe = resolve_recipe(args.args[0], working_dir)
        entrypoint = build_entrypoint(TRAIN_MODULE, ["train", recipe, *args.args[1:]])
        metadata["erc_verl_recipe"] = recipe
    commit = _git_commit(working_dir)
    if commit:
        metadata["git_commit"] = commit
    runtime_env = build_runtime_env(working_dir, parse_env(args.env or []))

    client, address = _connect(args)
    with _cluster_errors(address):
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=args.submission_id,
            runtime_env=runtime_env,
            metadata=metadata,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
        )
    # The id alone on stdout so scripts can capture it; the rest on stderr.
    print(job_id, flush=True)
    print(f"submitted: {entrypoint}", file=sys.stderr)
    if not args.follow:
        print(
            f"follow with: erc-verl jobs logs {job_id} --follow --address {address}\n"
            f"dashboard:   {address}/#/jobs/{job_id}",
            file=sys.stderr,
        )
        return EXIT_OK
    return follow(client, address, job_id)


def submit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="erc-verl submit",
        description="Submit a recipe (or the cluster smoke check) as a Ray job.",
        epilog="Overrides are Hydra-style (a.b=1, +x=y). Put `--` before arguments that start with '-'.",
    )
    parser.add_argument(
        "args", nargs="*", metavar="RECIPE [OVERRIDE ...]", help="recipe name under recipes/ and overrides"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="run `python -m erc_verl.runs.smoke [ARGS]` instead of a recipe"
    )
    parser.add_argument(
        "--follow", "-f", action="store_true", help="stream logs until the job ends; exit with its status"
    )
    parser.add_argument(
        "--env", action="append", metavar="KEY[=VALUE]", help="job env var; KEY alone forwards the local value"
    )
    parser.add_argument(
        "--working-dir", help="directory uploaded as the job's working_dir (default: the erc-verl checkout)"
    )
    parser.add_argument("--submission-id", help="job id to use instead of Ray's generated raysubmit_...")
    parser.add_argument(
        "--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver process (default: none)"
    )
    _add_connection_args(parser)
    # Everything after `--` is passed through untouched (intermixed parsing would read it as options).
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser.parse_intermixed_args(argv)
    args.args += rest
    return _run(_submit, args)


def _status(args) -> int:
    client, address = _connect(args)
    with _cluster_errors(address, args.job_id):
        info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status}")
    print(f"  entrypoint: {info.entrypoint}")
    for key in ("start_time", "end_time"):
        ms = getattr(info, key)
        if ms:
            print(f"  {key.replace('_', ' ')}: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(ms / 1000))}")
    if info.metadata:
        print("  metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items())))
    if info.status != "SUCCEEDED":
        reason = _failure_reason(info)
        if reason:
            print(f"  message: {reason}")
    return EXIT_OK


def _logs(args) -> int:
    client, address = _connect(args)
    if args.follow:
        return follow(client, address, args.job_id)
    with _cluster_errors(address, args.job_id):
        sys.stdout.write(client.get_job_logs(args.job_id))
    return EXIT_OK


def _stop(args) -> int:
    client, address = _connect(args)
    with _cluster_errors(address, args.job_id):
        was_running = client.stop_job(args.job_id)
        if not was_running:
            print(f"job {args.job_id} was not running ({client.get_job_status(args.job_id)})")
            return EXIT_OK
        info = _terminal_status(client, args.job_id, timeout_s=args.timeout)
    print(f"job {args.job_id}: {info.status}")
    if not info.status.is_terminal():
        print(f"erc-verl: job {args.job_id} has not ended after {args.timeout:g}s", file=sys.stderr)
        return EXIT_CLUSTER
    return EXIT_OK


def _list(args) -> int:
    client, address = _connect(args)
    with _cluster_errors(address):
        jobs = client.list_jobs()
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        recipe = (job.metadata or {}).get("erc_verl_recipe", "-")
        print(f"{job.submission_id or job.job_id}\t{job.status}\t{recipe}\t{job.entrypoint}")
    return EXIT_OK


def jobs_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="erc-verl jobs", description="Inspect and control submitted Ray jobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("status", _status, "status, entrypoint, times and failure message of a job"),
        ("logs", _logs, "a job's logs (--follow: stream until it ends, exit with its status)"),
        ("stop", _stop, "stop a job and wait until it has ended"),
        ("list", _list, "all jobs on the cluster"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        if name != "list":
            p.add_argument("job_id", help="submission id printed by `erc-verl submit` (raysubmit_...)")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true")
        if name == "stop":
            p.add_argument(
                "--timeout", type=float, default=60.0, help="seconds to wait for the job to end (default 60)"
            )
        _add_connection_args(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    return _run(args.fn, args)
