"""A 3FS-style storage cluster: aggregate read/write bounds and recovery traffic after a loss.

Storage nodes each carry ``nics_per_node`` NICs and ``ssds_per_node`` NVMe drives; files are striped in chunks over
replication chains of ``replicas`` targets on distinct nodes (CRAQ chain replication):

- read: any replica serves, so every node's NICs and SSDs work for readers;
  read  <= min(nodes x NIC, nodes x SSD read, clients x client NIC) x efficiency
- write: the client sends to the chain head, each target forwards to the next: every byte enters
  ``replicas`` nodes, leaves ``replicas - 1`` of them, and is written on ``replicas`` SSDs;
  write <= min(nodes x NIC / replicas, nodes x SSD write / replicas, clients x client NIC) x eff
- recovery: as 3FS recovers (its design notes, "Data recovery"), chains keep their targets: a lost node's targets
  go to the end of their chains, and once it returns (or its SSDs are replaced) each chain's predecessor copies its
  full state into it. The predecessors are spread over the survivors, but every byte of the lost node's data
  (``fill`` of its raw capacity) enters that one node: ``lost / (recovery_share x min(NIC x efficiency, SSD
  write))``, whatever the cluster's size (3FS: "syncing data to the new SSD can take several hours"). Until then
  its chains serve from one replica fewer.

``efficiency`` is the achievable fraction of line rate; its default 0.8 is the ratio of the
~40 GB/s effective to the 50 GB/s nominal that the V3 report gives for a 400 Gb/s NIC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flyer.errors import FieldError

TIB = 1024**4


@dataclass(frozen=True)
class StorageCluster:
    nodes: int = 180
    nics_per_node: int = 2
    nic_gbit_s: float = 200.0
    ssds_per_node: int = 16
    ssd_tib: float = 14.0
    ssd_read_gb_s: float = 6.0  # a PCIe 4 enterprise NVMe drive (assumption)
    ssd_write_gb_s: float = 3.0
    replicas: int = 3
    clients: int = 500
    client_nic_gbit_s: float = 200.0
    efficiency: float = 0.8
    fill: float = 0.5  # used fraction of raw capacity
    recovery_share: float = 0.5  # fraction of bandwidth recovery may take from foreground I/O

    def validate(self) -> None:
        for name in ("nodes", "nics_per_node", "ssds_per_node", "replicas", "clients"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1 (got {getattr(self, name)})")
        if self.replicas > self.nodes:
            raise FieldError("replicas", f"must be <= the {self.nodes} nodes (got {self.replicas})")
        for name in ("nic_gbit_s", "ssd_tib", "ssd_read_gb_s", "ssd_write_gb_s", "client_nic_gbit_s"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be > 0 (got {getattr(self, name)})")
        for name in ("efficiency", "fill", "recovery_share"):
            if not 0 < getattr(self, name) <= 1:
                raise FieldError(name, f"must be in (0, 1] (got {getattr(self, name)})")


def storage_model(c: StorageCluster) -> dict:
    """Throughput bounds (GB/s and TiB/s), capacity and single-node-loss recovery."""
    c.validate()
    nic = c.nics_per_node * c.nic_gbit_s / 8  # GB/s per node, each direction
    ssd_read, ssd_write = c.ssds_per_node * c.ssd_read_gb_s, c.ssds_per_node * c.ssd_write_gb_s
    clients = c.clients * c.client_nic_gbit_s / 8
    read_limits = {"storage_nics": c.nodes * nic, "ssds": c.nodes * ssd_read, "clients": clients}
    write_limits = {"storage_nics": c.nodes * nic / c.replicas, "ssds": c.nodes * ssd_write / c.replicas,
                    "clients": clients}
    read_by = min(read_limits, key=read_limits.get)
    write_by = min(write_limits, key=write_limits.get)
    read = read_limits[read_by] * c.efficiency
    write = write_limits[write_by] * c.efficiency
    raw = c.nodes * c.ssds_per_node * c.ssd_tib * TIB
    lost = c.ssds_per_node * c.ssd_tib * TIB * c.fill
    into = min(nic * c.efficiency, ssd_write) * c.recovery_share  # GB/s into the recovering node
    # one node has no other replica to recover from: None (JSON null, never a non-finite number)
    recovery_s = lost / 1e9 / into if c.nodes > 1 else None
    return {
        **asdict(c),
        "read_gb_s": read, "read_tib_s": read * 1e9 / TIB, "read_bound": read_by,
        "read_line_tib_s": read_limits[read_by] * 1e9 / TIB,  # at line rate (efficiency 1)
        "write_gb_s": write, "write_tib_s": write * 1e9 / TIB, "write_bound": write_by,
        "read_gb_s_per_node": read / c.nodes,
        "raw_capacity_pib": raw / 1024**5, "usable_capacity_pib": raw / c.replicas / 1024**5,
        "recovery_bytes": lost, "recovery_tib": lost / TIB,
        "recovery_nic_bytes": 2 * lost,  # each byte leaves a predecessor's NIC and enters the recovering node's
        "recovery_gb_s": into if c.nodes > 1 else None,
        "recovery_s": recovery_s, "recovery_min": None if recovery_s is None else recovery_s / 60,
    }
