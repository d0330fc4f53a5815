"""A stand-in CUDA driver for Triton, to run the GPU launch path on a machine without a GPU.

``install(on_launch)`` makes it Triton's active driver: kernels compile for sm_90 with the
ptxas of the triton wheel, as on an H100, and every launch calls
``on_launch(grid, stream, function, packed_metadata, launch_metadata, enter_hook,
exit_hook, args)`` instead of reaching a GPU (``function`` names the compiled kernel;
each pointer argument is ``["address", int]``, what the real launcher reads of it).
CPU tensors stand in for CUDA ones. Import it before triton in a process where
``TRITON_INTERPRET`` is unset (Triton decides at import whether to interpret). Used by
``fake_cuda_launches.py`` (tests) and ``benchmarks/triton_host_time.py``.
Raises ImportError where this Triton has no such driver to stand in for.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

MULTIPROCESSORS = 132  # an H100 SXM's


class _Utils:
    handles: dict = {}

    def load_binary(self, name, kernel, shared, device):
        handle = self.handles.setdefault(id(kernel), f"{name}#{len(self.handles)}")
        return handle, handle, 32, 0, 1024  # module, function, registers, spills, threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": MULTIPROCESSORS, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}

    def unload_module(self, module):
        pass


class _Driver(CudaDriver):
    on_launch = None

    def __init__(self):  # no CUDA: none of CudaDriver's own set-up
        self.utils = _Utils()
        driver_self = self

        class Launcher:
            def __init__(self, src, metadata):
                self.pointers = [str(kind).startswith("*") for kind in src.signature.values()]

            def __call__(self, gx, gy, gz, stream, function, packed_metadata,
                         launch_metadata, enter_hook, exit_hook, *args):
                if len(args) == len(self.pointers):
                    # a pointer argument as the real launcher reads it: an int is the
                    # address, anything else is asked for data_ptr()
                    args = tuple(["address", a if isinstance(a, int) else a.data_ptr()]
                                 if pointer else a for pointer, a in zip(self.pointers, args))
                driver_self.on_launch((gx, gy, gz), stream, function, packed_metadata,
                                      launch_metadata, enter_hook, exit_hook, args)

        self.launcher_cls = Launcher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 7

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_capability(self, device=None):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")


def install(on_launch) -> None:
    """Make the stand-in Triton's active driver; the triton backend then takes CPU tensors
    as if they were on the GPU."""
    stand_in = _Driver()
    stand_in.on_launch = on_launch
    driver.set_active(stand_in)
    import batchnorm.backends.triton as tb
    tb.supports = lambda t: t.dtype in tb._DTYPES
