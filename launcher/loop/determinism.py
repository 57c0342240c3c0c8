"""`--deterministic`: the settings that make a GPU run repeat itself bit for bit (docs/checkpoints.md says what
they buy). On the CPU they change nothing: its kernels are deterministic already.

The same settings as transformers' `enable_full_determinism`, without its seeding (the loop seeds) and with
the larger cuBLAS workspace torch's documentation recommends for speed.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

# Read by cuBLAS when the first handle is created (the first matmul on a GPU): set it before that.
CUBLAS_WORKSPACE = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def use_deterministic_algorithms(environ: MutableMapping[str, str] = os.environ) -> dict:
    """Deterministic kernels only (an op torch has none for raises, naming itself), cuDNN's deterministic
    algorithms without benchmarking, a fixed cuBLAS workspace; returns what is now in effect."""
    for key, value in CUBLAS_WORKSPACE.items():
        environ.setdefault(key, value)  # ":16:8", which the user may have chosen, is deterministic too
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return determinism_settings(environ)


def determinism_settings(environ: MutableMapping[str, str] = os.environ) -> dict:
    """The settings a run trained under, for config.json's run_info."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cublas_workspace_config": environ.get("CUBLAS_WORKSPACE_CONFIG")}
