"""`erc-verl submit` and `erc-verl jobs`: recipes on a Ray cluster, a thin layer over Ray's job SDK.

    erc-verl submit <recipe> [overrides...] --address http://HEAD:8265 [--follow]
    erc-verl submit --smoke --address http://HEAD:8265 --follow [-- --min-gpus 64]
    erc-verl jobs logs <id> --follow --address http://HEAD:8265     # exits with the job's status
    erc-verl jobs status|logs|stop|list|delete [<id>] ...            # Ray's `ray job ...`

The job runs `python -m erc_verl train <recipe> [overrides...]` with this checkout as its `working_dir` (first on
every worker's PYTHONPATH, so the erc_verl submitted is the one that runs); dependencies come from the nodes' image.
What this adds to `ray job`: the run is composed and checked here before anything is uploaded (overrides, ERC
settings, and with trainer.nnodes > 1 shared paths); the upload leaves out data and environments; the job loads the
plugin; the head is probed with timeouts; following a job exits with its status (`ray job logs --follow` exits 0
when the job failed). The token is Ray's own (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token); --auth-token(-file) set those. Exit codes: 0 success; 1 the job FAILED or was STOPPED; 2 usage
error; 3 cluster unreachable or token refused; 130 interrupted while following (the job keeps running).
"""

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import sys
import time
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import erc_verl
from erc_verl.runs import recipes

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_CLUSTER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
TRAIN_MODULE = "erc_verl"  # python -m erc_verl train RECIPE ...
SMOKE_MODULE = "erc_verl.runs.smoke"

# Never uploaded (gitignore syntax, relative to the checkout; Ray also honours .gitignore): a working_dir package
# is capped at a few hundred MiB, and checkpoints, data and environments belong on the cluster's shared storage.
WORKING_DIR_EXCLUDES = [
    ".venv", ".git", ".cache", ".pytest_cache", ".hypothesis", "__pycache__", "*.egg-info", "/build", "/dist",
    "outputs", "/runs", "multirun", "checkpoints", "wandb", "bench/results",
    "*.parquet", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.whl",
]

# Per-job environment. Node-level settings (NCCL, network interfaces) come from launch/start_ray_*.sh.
BASE_ENV_VARS = {"PYTHONUNBUFFERED": "1", "VERL_USE_EXTERNAL_MODULES": "erc_verl.plugin"}

AUTH_HELP = (
    "Ray 2.60 clusters require a token on the job API. On the submitting machine set RAY_AUTH_MODE=token and "
    "put the head's token in ~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or pass "
    "--auth-token-file PATH. Print the token on the head node with `ray get-auth-token`."
)
PORT_HINT = "Give the head's dashboard port (the job API: 8265 unless --dashboard-port), not the GCS port (6379)."


class SubmitError(Exception):
    """A failure with a message for the user and the exit code to return."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def resolve_address(address: str | None, environ=os.environ) -> str:
    """The job API URL from --address, RAY_API_SERVER_ADDRESS or RAY_ADDRESS; must be http(s)://host:port."""
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265, or set RAY_API_SERVER_ADDRESS",
                          EXIT_USAGE)
    parsed = urlparse(address)
    with contextlib.suppress(ValueError):
        if parsed.scheme in ("http", "https") and parsed.hostname and parsed.port is not None:
            return address.rstrip("/")
    raise SubmitError(f"bad cluster address {address!r}: expected http://HEAD:PORT, e.g. http://10.0.0.1:8265. "
                      f"{PORT_HINT}", EXIT_USAGE)


def use_token_flags(token: str | None, token_file: str | None, environ=os.environ) -> None:
    """Hand the flags to Ray's own token loader (read once, when ray is first imported): a token given means
    token mode, and the flag wins over RAY_AUTH_TOKEN, which Ray reads before any file."""
    if token:
        environ["RAY_AUTH_TOKEN"] = token
    elif token_file:
        environ.pop("RAY_AUTH_TOKEN", None)
        environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).expanduser())
    if token or token_file:
        environ["RAY_AUTH_MODE"] = "token"
    elif environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH"):
        environ.setdefault("RAY_AUTH_MODE", "token")


def probe(address: str, timeout_s: float) -> str:
    """The cluster's auth mode, from the dashboard's public GET /api/authentication_mode, with timeouts: the SDK's
    own first request has none, and a firewalled host or the GCS port would hang it for minutes."""
    import requests
    import urllib3

    try:
        r = requests.get(f"{address}/api/authentication_mode", timeout=timeout_s)
    except requests.exceptions.ConnectTimeout:
        raise SubmitError(f"timed out after {timeout_s:g}s connecting to {address}: the head is down or a firewall "
                          "drops the port; from outside the cluster tunnel it: ssh -L 8265:localhost:8265 HEAD",
                          EXIT_CLUSTER)
    except requests.exceptions.ReadTimeout:
        raise SubmitError(f"{address} sent no HTTP answer in {timeout_s:g}s. {PORT_HINT}", EXIT_CLUSTER)
    except requests.exceptions.RequestException as err:
        reason = getattr(err.args[0], "reason", err) if err.args else err
        if isinstance(reason, urllib3.exceptions.NameResolutionError):
            raise SubmitError(f"cannot resolve the head's host name {urlparse(address).hostname!r}", EXIT_CLUSTER)
        raise SubmitError(f"cannot reach the Ray head at {address} ({reason}). Is Ray running there "
                          f"(launch/start_ray_head.sh)? {PORT_HINT}", EXIT_CLUSTER)
    try:
        return r.json()["authentication_mode"]
    except (ValueError, KeyError, TypeError):
        raise SubmitError(f"{address} is not a Ray job API (GET /api/authentication_mode: HTTP {r.status_code}). "
                          f"{PORT_HINT}", EXIT_CLUSTER)


@contextlib.contextmanager
def cluster_errors(address: str, job_id: str | None = None):
    """The job SDK's exceptions as messages that say what to do."""
    import click
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        text = str(err).split("\n", 1)[0]
        problem = "rejected the auth token" if "Forbidden" in text else "requires an auth token"
        raise SubmitError(f"the Ray cluster at {address} {problem} ({text}). {AUTH_HELP}", EXIT_CLUSTER)
    except requests.exceptions.RequestException as err:
        raise SubmitError(f"{address} does not answer as a Ray job API ({err}). {PORT_HINT}", EXIT_CLUSTER)
    except click.ClickException as err:  # `ray job ...`'s own usage errors
        raise SubmitError(err.format_message(), EXIT_USAGE)
    except RuntimeError as err:
        if "404" in str(err) and job_id is not None:
            raise SubmitError(f"no job {job_id!r} on the cluster at {address}", EXIT_USAGE)
        raise SubmitError(f"the Ray job API at {address} returned an error: {str(err).strip()}", EXIT_CLUSTER)


def connect(args):
    """A JobSubmissionClient for --address, once the head answered in time (the token: Ray's own loader)."""
    address = resolve_address(args.address)
    if probe(address, args.connect_timeout) == "token" and os.environ.get("RAY_AUTH_MODE") != "token":
        raise SubmitError(f"the Ray cluster at {address} requires an auth token. {AUTH_HELP}", EXIT_CLUSTER)
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(address):
        return JobSubmissionClient(address), address


def check_working_dir(working_dir: Path) -> Path:
    """The upload must be an erc-verl checkout, never e.g. site-packages of a non-editable install."""
    working_dir = working_dir.resolve()
    pyproject = working_dir / "pyproject.toml"
    if not (working_dir / "erc_verl" / "__init__.py").is_file() or not pyproject.is_file():
        raise SubmitError(f"{working_dir} is not an erc-verl checkout (no pyproject.toml and erc_verl/): run from "
                          "the repository or pass --working-dir", EXIT_USAGE)
    if not re.search(r'^name\s*=\s*"erc-verl"', pyproject.read_text(), re.MULTILINE):
        raise SubmitError(f"{pyproject} is not erc-verl's; pass --working-dir", EXIT_USAGE)
    return working_dir


def resolve_recipe(recipe: str, working_dir: Path) -> str:
    """The recipe name, checked here so that a typo fails in a second, not after the upload."""
    try:
        return recipes.resolve(recipe, working_dir / "recipes")
    except recipes.RecipeError as err:
        raise SubmitError(str(err), EXIT_USAGE) from None


def check_run(recipe: str, hydra_args: list[str], working_dir: Path, job_env: dict[str, str]) -> None:
    """Compose the run as the job will (its recipes, overrides and `--env`) and run the start-up checks that need
    no cluster: a bad override, a bad ERC setting or a path the nodes do not share fails before the upload."""
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from erc_verl.core.config import ErcConfigError
    from erc_verl.runs.preflight import PreflightError, check_shared_paths

    parsed = get_args_parser().parse_args(hydra_args)
    if parsed.cfg or parsed.help or parsed.hydra_help or parsed.info or parsed.multirun:
        return  # the job prints a config, or sweeps: `erc-verl train` checks each run of a sweep
    try:
        with mock.patch.dict(os.environ, {**job_env, recipes.RECIPES_ENV: str(working_dir / "recipes")}):
            check_shared_paths(recipes.compose(recipe, parsed.overrides))
    except (HydraException, OmegaConfBaseException, ErcConfigError, PreflightError) as err:
        raise SubmitError(f"{recipe}: {err}", EXIT_USAGE) from None


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
        if not sep and key not in environ:
            raise SubmitError(f"--env {key}: {key} is not set in this environment", EXIT_USAGE)
        out[key] = value if sep else environ[key]
    return out


def build_runtime_env(working_dir: Path, extra_env: dict[str, str]) -> dict:
    env_vars = {**BASE_ENV_VARS, **extra_env}
    # The plugin stays loaded next to the user's own modules.
    modules = [BASE_ENV_VARS["VERL_USE_EXTERNAL_MODULES"], *extra_env.get("VERL_USE_EXTERNAL_MODULES", "").split(",")]
    env_vars["VERL_USE_EXTERNAL_MODULES"] = ",".join(dict.fromkeys(m for m in modules if m))
    return {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env_vars}


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
        with cluster_errors(address, job_id):
            client.get_job_info(job_id)  # an unknown id fails here with a clear message, not in the websocket
            try:
                asyncio.run(stream())
            except (RuntimeError, aiohttp.ClientError) as err:  # the websocket dropped; the job may be fine
                raise SubmitError(f"lost the log stream of job {job_id} ({err}); it may still be running: "
                                  f"erc-verl jobs status {job_id} --address {address}", EXIT_CLUSTER)
            info = client.get_job_info(job_id)
            deadline = time.monotonic() + 30  # the stream can close a moment before the status turns terminal
            while not info.status.is_terminal() and time.monotonic() < deadline:
                time.sleep(0.5)
                info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. Stop it with: erc-verl jobs stop {job_id} "
              f"--address {address}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if info.status == JobStatus.SUCCEEDED:
        print(f"job {job_id} SUCCEEDED", file=sys.stderr)
        return EXIT_OK
    # Ray's message starts with the reason (the rest repeats the log tail already streamed)
    reason = (info.message or "").strip().split("\n", 1)[0].rstrip(":")
    if info.driver_exit_code is not None and str(info.driver_exit_code) not in reason:
        reason = f"{reason} (driver exit code {info.driver_exit_code})".strip()
    print(f"job {job_id} {info.status}{': ' + reason if reason else ''}", file=sys.stderr)
    return EXIT_JOB_FAILED


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster connection")
    g.add_argument("--address", help="job API of the head, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    g.add_argument("--auth-token-file", help="file holding the cluster's token (default: Ray's own sources)")
    g.add_argument("--auth-token", help="the token itself (visible in `ps`: prefer the file or RAY_AUTH_TOKEN)")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the head (default 10)")


def _run(fn, args, *rest) -> int:
    use_token_flags(args.auth_token, args.auth_token_file)  # before anything imports ray
    try:
        return fn(args, *rest)
    except SubmitError as err:
        print(f"erc-verl: {err}", file=sys.stderr)
        return err.code


def _submit(args) -> int:
    working_dir = check_working_dir(Path(args.working_dir) if args.working_dir else recipes.CHECKOUT_DIR)
    job_env = parse_env(args.env or [])
    if args.smoke:
        entrypoint, recipe = build_entrypoint(SMOKE_MODULE, args.args), "smoke"
    else:
        if not args.args:
            available = ", ".join(recipes.available(working_dir / "recipes")) or "(none)"
            raise SubmitError(f"which recipe? usage: erc-verl submit <recipe> [overrides...]; available: {available}",
                              EXIT_USAGE)
        recipe = resolve_recipe(args.args[0], working_dir)
        check_run(recipe, args.args[1:], working_dir, job_env)
        entrypoint = build_entrypoint(TRAIN_MODULE, ["train", recipe, *args.args[1:]])
    client, address = connect(args)
    with cluster_errors(address):
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=args.submission_id,
            runtime_env=build_runtime_env(working_dir, job_env),
            metadata={"erc_verl_version": erc_verl.__version__, "erc_verl_recipe": recipe},
            entrypoint_num_cpus=args.entrypoint_num_cpus,
        )
    print(job_id, flush=True)  # alone on stdout, for scripts; the rest on stderr
    print(f"submitted: {entrypoint}", file=sys.stderr)
    if args.follow:
        return follow(client, address, job_id)
    print(f"follow with: erc-verl jobs logs {job_id} --follow --address {address}", file=sys.stderr)
    return EXIT_OK


def submit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="erc-verl submit",
        description="Submit a recipe (or the cluster smoke check) as a Ray job.",
        epilog="Overrides are Hydra-style (a.b=1, +x=y). Put `--` before arguments that start with '-'.",
    )
    parser.add_argument("args", nargs="*", metavar="RECIPE [OVERRIDE ...]", help="recipe name and overrides")
    parser.add_argument("--smoke", action="store_true", help="run `python -m erc_verl.runs.smoke [ARGS]` instead")
    parser.add_argument("--follow", "-f", action="store_true", help="stream logs until the job ends, exit with it")
    parser.add_argument("--env", action="append", metavar="KEY[=VALUE]", help="job env var; KEY alone: the local value")
    parser.add_argument("--working-dir", help="directory uploaded as the job's working_dir (default: this checkout)")
    parser.add_argument("--submission-id", help="job id to use instead of Ray's generated raysubmit_...")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default: none)")
    _add_connection_args(parser)
    # Everything after `--` goes to the job untouched (intermixed parsing would read it as options).
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser.parse_intermixed_args(argv)
    args.args += rest
    return _run(_submit, args)


def _jobs(args, ray_args: list[str]) -> int:
    client, address = connect(args)
    if args.command == "logs" and args.follow:
        return follow(client, address, args.job_id)
    from ray.dashboard.modules.job.cli import job_cli_group

    ray_argv = [args.command, *([args.job_id] if args.job_id else []), "--address", address, *ray_args]
    with cluster_errors(address, args.job_id):
        job_cli_group.main(ray_argv, prog_name="erc-verl jobs", standalone_mode=False)
    return EXIT_OK


def jobs_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="erc-verl jobs",
        description="Ray's `ray job` commands on a submitted job, after the same connection checks as submit.",
        epilog="Other options go to `ray job COMMAND` (e.g. `stop --no-wait`).",
    )
    parser.add_argument("command", choices=("status", "logs", "stop", "list", "delete"))
    parser.add_argument("job_id", nargs="?", help="submission id printed by `erc-verl submit` (raysubmit_...)")
    parser.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends, exit with it")
    _add_connection_args(parser)
    args, ray_args = parser.parse_known_args(argv)
    if (args.job_id is None) != (args.command == "list"):
        parser.error(f"{args.command}: " + ("takes no job id" if args.job_id else "which job? give its id"))
    return _run(_jobs, args, ray_args)
