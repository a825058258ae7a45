"""Cluster smoke check: can every node of this Ray cluster run erc-verl?

`python -m erc_verl.runs.smoke [--min-nodes N] [--min-gpus G] [--wait S] [--require-loss NAME ...]`

Connects to the running cluster (RAY_ADDRESS, which a Ray job sets, else `auto`), waits until N nodes and
G GPUs have joined, then on every alive node imports verl in a Ray task and checks that verl's policy-loss
registry holds the ERC losses (`erc_dapo` unless --require-loss says otherwise) and which copy of erc_verl
was imported. On every node that advertises GPUs, a second task holding all of them checks that CUDA sees as
many devices as Ray counts (Ray's count is only what `ray start --num-gpus` said); a node whose torch is a CPU
build (a CPU cluster, whose logical GPUs are the CPU platform's workers) is skipped, and says so.
Exit 0 and one `erc-verl smoke OK` line, or exit 1 with the reasons. `erc-verl submit --smoke` runs it as a Ray
job; the SLURM template runs it on the head to wait for all workers before training.
"""

import argparse
import os
import socket
import sys
import time

DEFAULT_REQUIRED_LOSSES = ("erc_dapo",)


def _node_report(required: list[str]) -> dict:
    """What this process sees: runs in the driver and, as a Ray task, on every node."""
    import verl  # noqa: F401  loads the `verl.plugins` entry points / VERL_USE_EXTERNAL_MODULES
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    import erc_verl

    # Losses erc_verl put into verl's registry, found by where the function lives (name-agnostic).
    ours = sorted(
        name
        for name, fn in POLICY_LOSS_REGISTRY.items()
        if getattr(getattr(fn, "func", fn), "__module__", "").startswith("erc_verl")
    )
    return {
        "host": socket.gethostname(),
        "erc_verl": os.path.dirname(os.path.abspath(erc_verl.__file__)),
        "erc_losses": ours,
        "missing": [name for name in required if name not in POLICY_LOSS_REGISTRY],
    }


def _cuda_report() -> dict:
    """What CUDA sees in a task holding all of a node's GPUs (Ray sets CUDA_VISIBLE_DEVICES to them)."""
    import torch

    report = {"host": socket.gethostname(), "cuda_build": torch.version.cuda}
    if torch.version.cuda is not None:
        report["devices"] = torch.cuda.device_count()  # 0 with a driver too old for the build, or none attached
        report["names"] = sorted({torch.cuda.get_device_name(i) for i in range(report["devices"])})
    return report


def check_cuda(report: dict, ray_gpus: float) -> str | None:
    """A problem with what CUDA sees on a node Ray gives `ray_gpus` GPUs, or None."""
    if report["cuda_build"] is None:
        return None
    if report["devices"] < ray_gpus:
        return (
            f"Ray counts {ray_gpus:g} GPU(s) but CUDA sees {report['devices']}: check `nvidia-smi` there, the "
            "driver (the GPU image needs R580+), CUDA_VISIBLE_DEVICES, and `docker run --gpus all`"
        )
    return None


def _wait_for_resources(ray, min_nodes: int, min_gpus: float, wait_s: float) -> tuple[list[dict], float]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        gpus = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
        if len(nodes) >= min_nodes and gpus >= min_gpus:
            return nodes, gpus
        if time.monotonic() >= deadline:
            raise SystemExit(
                f"erc-verl smoke FAILED: the cluster has {len(nodes)} node(s) and {gpus:g} GPU(s) after "
                f"{wait_s:g}s, wanted at least {min_nodes} node(s) and {min_gpus:g} GPU(s). Check that every "
                "worker ran launch/start_ray_worker.sh against this head and that the GPUs are visible there."
            )
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erc_verl.runs.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-nodes", type=int, default=1, help="alive nodes to wait for (default 1)")
    parser.add_argument("--min-gpus", type=float, default=0, help="GPUs the cluster must show (default 0)")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for nodes/GPUs to join (default 0)")
    parser.add_argument(
        "--require-loss",
        action="append",
        metavar="NAME",
        help=f"policy loss that must be registered in verl (repeatable; default {', '.join(DEFAULT_REQUIRED_LOSSES)})",
    )
    args = parser.parse_args(argv)
    required = args.require_loss or list(DEFAULT_REQUIRED_LOSSES)

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="WARNING")
    try:
        nodes, gpus = _wait_for_resources(ray, args.min_nodes, args.min_gpus, args.wait)

        def on(node, fn, num_gpus=0.0):
            # pinned to the node; num_cpus=0 so that a busy node still runs it
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            return ray.remote(num_cpus=0, num_gpus=num_gpus)(fn).options(scheduling_strategy=strategy)

        # A node whose Python env lacks verl or the plugin fails here, not hours into a run.
        reports = ray.get([on(n, _node_report).remote(required) for n in nodes])
        node_gpus = [n["Resources"].get("GPU", 0.0) for n in nodes]
        gpu_nodes = [(n, g) for n, g in zip(nodes, node_gpus, strict=True) if g > 0]
        cuda = ray.get([on(n, _cuda_report, g).remote() for n, g in gpu_nodes], timeout=max(args.wait, 120))
    except ray.exceptions.GetTimeoutError:
        raise SystemExit("erc-verl smoke FAILED: the GPU check could not get every node's GPUs in time (a run holds "
                         "them?)") from None
    finally:
        ray.shutdown()

    problems = []
    for r in reports:
        print(f"node {r['host']}: erc_verl from {r['erc_verl']}; erc losses in verl: {r['erc_losses'] or 'none'}")
        if r["missing"]:
            problems.append(
                f"node {r['host']}: policy loss(es) {r['missing']} not registered in verl: erc_verl.plugin did not "
                "load there (is erc-verl installed in that node's environment, and VERL_USE_EXTERNAL_PLUGINS not "
                "'none'?)"
            )
    for (_, ray_gpus), r in zip(gpu_nodes, cuda, strict=True):
        if r["cuda_build"] is None:
            print(f"node {r['host']}: {ray_gpus:g} GPU(s) in Ray; CUDA check skipped: torch is a CPU build")
            continue
        print(f"node {r['host']}: {ray_gpus:g} GPU(s) in Ray, CUDA {r['cuda_build']} sees {r['devices']}: "
              f"{', '.join(r['names']) or '-'}")
        problem = check_cuda(r, ray_gpus)
        if problem:
            problems.append(f"node {r['host']}: {problem}")
    if not gpu_nodes:
        print("no node advertises GPUs: CUDA check skipped")
    if problems:
        print("\n".join(problems + ["erc-verl smoke FAILED"]), file=sys.stderr)
        return 1
    print(f"erc-verl smoke OK: {len(reports)} node(s), {gpus:g} GPU(s), losses {sorted(required)} registered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
