"""Expert parallelism on torch.distributed (gloo on CPU, NCCL on CUDA, launched by torchrun).

- ``mesh``: process layout and groups (``init_distributed``, ``validate_layout``, ``Mesh``).
- ``dispatch``: the ``Dispatcher`` seam (local, flat all-to-all, hierarchical node-aware),
  ``dispatcher_factory`` for ``Transformer``, traffic counters (``comm_stats``).
- ``wire``: FP8 rows as bytes.
- ``grads``: replica broadcast, gradient sums, global-norm clipping, full-layout state dicts.
- ``launch``: run a function on N local ranks with a torchrun-like environment.
"""
