"""How a model is spread over the processes, beyond what Accelerate does by itself.

- `fsdp`: FSDP2: what the accelerate config asked for against what runs (never a silent downgrade), and
  FSDP2 over gloo on CPU, applied by the launcher;
- `unused_parameters`: the one-batch probe that sets DDP's `find_unused_parameters` before `prepare`.
"""
