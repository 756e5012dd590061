"""Ports: a free one on this host, and the block of ports one Slurm job uses on every node.

Each job gets a block of SLOT_WIDTH ports chosen by its id, so two jobs sharing a node do not
clash; inside it, the rendezvous and Ray's head ports, then one set per node.
"""
import dataclasses
import socket

# Ports: one block of SLOT_WIDTH per job, chosen by job id, so two jobs sharing a node do not clash.
FIRST_PORT = 12000
PORT_SLOTS = 50
SLOT_WIDTH = 400
# Logical nodes on one host (and real nodes, harmlessly) get distinct port sets by index modulo this.
NODE_PORT_SETS = 4
NODE_FIXED_PORTS = ("node_manager", "object_manager", "dashboard_agent_grpc", "dashboard_agent_listen",
                    "metrics_export", "runtime_env_agent")
WORKER_PORTS_PER_NODE = 80


@dataclasses.dataclass(frozen=True)
class JobPorts:
    base: int

    @property
    def master(self) -> int:
        """torch.distributed rendezvous on the first node."""
        return self.base

    @property
    def gcs(self) -> int:
        """Ray's GCS on the first node."""
        return self.base + 1

    @property
    def ray_client(self) -> int:
        return self.base + 2

    def node(self, index: int) -> dict[str, int]:
        """The Ray ports of the node at `index` in the allocation."""
        k = index % NODE_PORT_SETS
        fixed = {name: self.base + 10 + 8 * k + i for i, name in enumerate(NODE_FIXED_PORTS)}
        first_worker = self.base + 50 + WORKER_PORTS_PER_NODE * k
        return {**fixed, "min_worker": first_worker, "max_worker": first_worker + WORKER_PORTS_PER_NODE - 1}

    def on_node(self, index: int) -> list[int]:
        """Every port a node listens on (the worker range excluded: Ray probes it itself)."""
        ports = [p for name, p in self.node(index).items() if name not in ("min_worker", "max_worker")]
        return [self.master, self.gcs, self.ray_client, *ports] if index == 0 else ports


def job_ports(job_id: str, port_base: int = 0) -> JobPorts:
    if port_base:
        return JobPorts(port_base)
    return JobPorts(FIRST_PORT + (int(job_id) % PORT_SLOTS) * SLOT_WIDTH)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False
