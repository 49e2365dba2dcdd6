"""Row-strided copies between GPU buffers on a copy engine (`cudaMemcpy2DAsync`): bytes move over NVLink
without taking the SMs the kernels beside them need (PyTorch's `copy_` of a strided tensor is a kernel)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (unified) addresses


@functools.cache
def _memcpy_2d() -> Any:
    """cudaMemcpy2DAsync of the CUDA runtime PyTorch loaded (the same library, so the same context), or None
    where there is none (CPU builds)."""
    path = _loaded_cudart() or ctypes.util.find_library("cudart")
    if path is None:
        return None
    try:
        function = ctypes.CDLL(path).cudaMemcpy2DAsync
    except (OSError, AttributeError):
        return None
    size = ctypes.c_size_t
    function.argtypes = [
        ctypes.c_void_p,
        size,
        ctypes.c_void_p,
        size,
        size,
        size,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    function.restype = ctypes.c_int
    return function


def _loaded_cudart() -> str | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libcudart.so" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def _rows(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(batch stride, row pitch) in bytes of a [B, R, h, D] tensor whose rows (h × D) are contiguous."""
    if tensor.dim() != 4 or tensor.stride(-1) != 1 or tensor.stride(-2) != tensor.shape[-1]:
        return None
    size = tensor.element_size()
    return tensor.stride(0) * size, tensor.stride(1) * size


def copy_rows(target: torch.Tensor, source: torch.Tensor) -> bool:
    """Copy `source` into `target` ([B, R, h, D] each, rows contiguous) on a copy engine, ordered on the
    current stream (and recorded into a CUDA graph being captured there). False, with nothing copied, where
    the layouts or the runtime do not allow it: the caller then copies with a kernel."""
    function = _memcpy_2d()
    if function is None or not (target.is_cuda and source.is_cuda):
        return False
    if target.shape != source.shape or target.dtype != source.dtype:
        return False
    target_rows, source_rows = _rows(target), _rows(source)
    if target_rows is None or source_rows is None:
        return False
    batch, rows, heads, dim = source.shape
    width = heads * dim * source.element_size()
    stream = torch.cuda.current_stream(source.device).cuda_stream
    for index in range(batch):
        status = function(
            target.data_ptr() + index * target_rows[0],
            target_rows[1],
            source.data_ptr() + index * source_rows[0],
            source_rows[1],
            width,
            rows,
            _MEMCPY_DEFAULT,
            stream,
        )
        if status != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {status}")
    return True
