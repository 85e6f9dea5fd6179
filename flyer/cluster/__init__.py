"""Cluster analysis from first principles: training cost and memory (``costs``), GPU and fabric
specs (``hardware``), network topologies (``topology``), communication models (``comm``), a
flow-level all-to-all simulator (``netsim``), 3FS storage (``storage``) and pipeline schedules
(``pipeline``). ``cli`` wires them to ``flyer plan`` and ``flyer net``, whose numeric flags have
physical ranges (``flags``)."""
