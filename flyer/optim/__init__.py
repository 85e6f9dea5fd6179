"""Optimizers beyond PyTorch's own, below ``flyer.parallel`` (ZeRO-1 shards them) and ``flyer.train``.

- ``muon``: DeepSeek-V4's Muon (hybrid Newton-Schulz, update RMS matched to AdamW's) with AdamW for
  the parameters it leaves out, and the routing of a model's parameters between the two.
"""
