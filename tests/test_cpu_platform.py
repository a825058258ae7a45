"""The CPU platform: registration, auto-selection only without accelerators, and what verl sees through it."""

import os

import pytest
import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from erc_verl.platform import cpu as cpu_platform

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


def test_registered_and_selected_on_a_machine_without_accelerator():
    from verl.utils.device import get_device_name, get_nccl_backend, get_resource_name

    assert PlatformRegistry.get("cpu") is cpu_platform.PlatformCPU
    assert cpu_platform.is_active()
    assert get_device_name() == "cpu"
    assert get_nccl_backend() == "gloo"
    assert get_resource_name() == "GPU"  # logical GPUs in Ray, one per verl worker
    assert os.environ["VERL_ENGINE_DEVICE"] == "cuda"  # verl's FSDP engine, registered for cuda, runs on CPU


def test_steps_aside_when_another_platform_is_available():
    # PlatformBase is abstract: borrow the CPU implementation for everything but detection.
    fake = type(
        "FakeAccelerator",
        (PlatformBase,),
        {
            **{k: v for k, v in vars(cpu_platform.PlatformCPU).items() if not k.startswith("__")},
            "is_platform_available": lambda self, use_smi_check=False: True,
        },
    )
    PlatformRegistry.register("fake_accel")(fake)
    try:
        assert not cpu_platform.PlatformCPU().is_platform_available(use_smi_check=True)
    finally:
        PlatformRegistry._platforms.pop("fake_accel")
    assert cpu_platform.PlatformCPU().is_platform_available(use_smi_check=True)


def test_device_module_stand_in():
    dev = cpu_platform.PlatformCPU().device_module
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    assert dev.get_device_name() == "CPU"
    assert dev.current_device() == "cpu"  # verl does tensor.to(get_device_id())
    assert torch.zeros(1).to(dev.current_device()).device.type == "cpu"
    assert not dev.is_available()  # verl then skips GPU-memory bookkeeping
    state = dev.get_rng_state()
    a = torch.rand(3)
    dev.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
    dev.empty_cache()
    dev.synchronize()


@pytest.mark.parametrize(
    "given, expected",
    [(None, "gloo"), ("cpu:gloo,cpu:gloo", "gloo"), ("cpu:gloo", "gloo"), ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl")],
)
def test_gloo_only_backend(given, expected):
    assert cpu_platform._gloo_only(given) == expected


def test_verl_process_group_init_works_on_cpu(monkeypatch):
    import torch.distributed as dist
    from verl.utils import distributed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.initialize_global_process_group_ray(timeout_second=30)
    try:
        t = torch.ones(2)
        dist.all_reduce(t)
        assert dist.get_backend() == "gloo" and torch.equal(t, torch.ones(2))
    finally:
        dist.destroy_process_group()
