"""Test-wide setup. Without a GPU, Triton kernels run under its interpreter, which must be
switched on before any @triton.jit function is defined, so it is set here, first."""
import os


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
