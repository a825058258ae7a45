"""A verl platform for machines without an accelerator.

Registered as ``cpu`` in verl's ``PlatformRegistry``. verl's auto-detection probes registered platforms in order
and this one answers "available" only when no other registered platform does, so GPU/NPU machines never pick it;
``VERL_PLATFORM=cpu`` forces it. When it is the platform of a process, :func:`register` also applies the two
process-level fixes stock verl needs on CPU (gloo-only process groups, the FSDP engine for device ``cpu``).
"""

import logging
import os
import sys
import types
from contextlib import contextmanager
from typing import Any, Optional

import psutil
import torch

from verl.plugin.platform import PlatformBase, PlatformRegistry, get_platform

logger = logging.getLogger(__name__)

NAME = "cpu"


class _CPUDeviceModule(types.ModuleType):
    """Stand-in for ``torch.cuda`` as verl uses it through ``get_torch_device()``.

    ``torch.cpu`` lacks the memory/cache/RNG calls verl makes unconditionally; they become no-ops or host figures.
    ``is_available()`` is False so verl skips its GPU-memory bookkeeping paths.
    """

    def __init__(self):
        super().__init__("erc_verl_cpu_device")

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def current_device() -> str:
        # verl does `tensor.to(get_device_id())`: an int would mean cuda:<int>.
        return "cpu"

    @staticmethod
    def set_device(device=None) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def ipc_collect() -> None:
        pass

    @staticmethod
    def set_per_process_memory_fraction(fraction, device=None) -> None:
        pass

    @staticmethod
    def mem_get_info(device=None) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"

    @staticmethod
    def get_rng_state(device=None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


_DEVICE_MODULE = _CPUDeviceModule()


class PlatformCPU(PlatformBase):
    """Host CPU as verl's "accelerator": device ``cpu``, gloo collectives, Ray's (logical) ``GPU`` resource.

    verl's worker placement always asks Ray for one accelerator per worker; on CPU the cluster is started with
    logical GPUs (``ray_init.num_gpus``) so those bundles schedule.
    """

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        for name in PlatformRegistry.registered_names():
            cls = PlatformRegistry.get(name)
            if cls is None or issubclass(cls, PlatformCPU):
                continue
            try:
                if cls().is_platform_available(use_smi_check=use_smi_check):
                    return False
            except Exception:  # a broken probe of another platform must not make it look present
                continue
        return True

    def current_device(self):
        return _DEVICE_MODULE.current_device()

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for actors holding logical GPUs; verl reads it back. Harmless without CUDA.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def is_active() -> bool:
    """True when this process's verl platform is the CPU one (resolves verl's platform singleton)."""
    return get_platform().device_name == NAME


def _gloo_only(backend: Optional[str]) -> str:
    # verl builds "cpu:gloo,<device>:<backend>", i.e. "cpu:gloo,cpu:gloo" here, which torch rejects.
    if backend is None:
        return "gloo"
    parts = {p.split(":", 1)[-1] for p in backend.split(",")}
    return "gloo" if parts == {"gloo"} else backend


def _patch_process_group_init() -> None:
    """Wrap verl 0.9.1 `verl/utils/distributed.py::initialize_global_process_group_ray` (no extension point for
    the backend string) so the default process group is plain gloo."""
    from verl.utils import distributed

    orig_ray = distributed.initialize_global_process_group_ray

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return orig_ray(timeout_second=timeout_second, backend=_gloo_only(backend))

    distributed.initialize_global_process_group_ray = initialize_global_process_group_ray
    # engine_workers imports the function by name: rebind it there too if it was imported already.
    engine_workers = sys.modules.get("verl.workers.engine_workers")
    if engine_workers is not None:
        engine_workers.initialize_global_process_group_ray = initialize_global_process_group_ray


_registered = False


def register() -> bool:
    """Register the platform; when it is this process's platform, apply the CPU process fixes. Idempotent.

    Returns whether the CPU platform is active.
    """
    global _registered
    if not _registered:
        PlatformRegistry.register(platform=NAME)(PlatformCPU)
        _registered = True
        if is_active():
            # verl registers its FSDP engine for cuda/npu only; it runs unchanged on CPU tensors.
            os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
            _patch_process_group_init()
            logger.info("erc_verl: verl CPU platform active")
    return is_active()
