"""Expert parallelism on torch.distributed (gloo on CPU, NCCL on CUDA, launched by torchrun).

- ``mesh``: process layout and groups (``init_distributed``, ``validate_layout``, ``Mesh``).
- ``dispatch``: the exchanging dispatchers (flat all-to-all, hierarchical node-aware) of the
  model's ``Dispatcher`` seam, ``dispatcher_factory`` for ``Transformer``, traffic counters
  (``comm_stats``).
- ``grads``: replica broadcast, gradient sums, global-norm clipping, full-layout state dicts.
- ``launch``: run a function on N local ranks with a torchrun-like environment.
"""
