"""Named NCCL/Gloo network profiles: the environment every rank gets for the cluster's fabric.

Each profile sets the variables its fabric needs (which interface the bootstrap and Gloo use, whether NCCL
uses InfiniBand verbs, which adapters, the RoCE GID index, libfabric's EFA provider) plus what every job
wants: asynchronous NCCL error handling (a failed collective tears the job down instead of hanging) and, when
``cluster.flight_recorder_dir`` is set, the flight recorder's dump on timeouts. ``cluster.env`` is applied
last, so any variable can be overridden.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct

from sparsetron.config import ClusterConfig, NetworkProfile

# NCCL accepts an exclusion list; Gloo needs one concrete interface, so it is only set when known.
_NCCL_ANY_BUT_LOCAL = "^lo,docker"


def _fabric(cluster: ClusterConfig) -> dict[str, str]:
    profile, nic = cluster.network_profile, cluster.network_interface
    if profile == NetworkProfile.loopback:
        return {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1"}
    env = {"NCCL_SOCKET_IFNAME": nic or _NCCL_ANY_BUT_LOCAL}
    if nic:
        env["GLOO_SOCKET_IFNAME"] = nic
    if profile == NetworkProfile.socket:
        env["NCCL_IB_DISABLE"] = "1"
    elif profile in (NetworkProfile.ib, NetworkProfile.roce):
        env |= {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": cluster.ib_hca or "mlx5"}
        if profile == NetworkProfile.roce:
            env["NCCL_IB_GID_INDEX"] = "3"  # RoCE v2 on most adapters (`show_gids` lists them)
    elif profile == NetworkProfile.efa:
        env |= {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_IB_DISABLE": "1"}
    return env


def network_env(cluster: ClusterConfig) -> dict[str, str]:
    """Environment variables for every rank of a job on ``cluster`` (profile, then ``cluster.env``)."""
    env = _fabric(cluster) | {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "NCCL_DEBUG": "WARN"}
    if cluster.flight_recorder_dir:
        env |= {
            "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": f"{cluster.flight_recorder_dir.rstrip('/')}/nccl_trace_rank_",
        }
    return env | {str(k): str(v) for k, v in cluster.env.items()}


def network_problems(cluster: ClusterConfig) -> list[str]:
    """Why this profile cannot work for the cluster's shape (empty when it can)."""
    problems = []
    if cluster.network_profile == NetworkProfile.loopback and cluster.nodes > 1:
        problems.append(
            f"cluster.network_profile=loopback cannot join {cluster.nodes} nodes; use socket (with "
            "cluster.network_interface), ib, roce or efa"
        )
    if (
        cluster.network_profile == NetworkProfile.socket
        and cluster.nodes > 1
        and not cluster.network_interface
    ):
        problems.append(
            "cluster.network_profile=socket across nodes needs cluster.network_interface (the NIC the nodes "
            "reach each other on, e.g. eth0; `ip -br addr` lists them) so Gloo does not bind to loopback"
        )
    return problems


# <linux/sockios.h>: read an interface's (primary) IPv4 address; ifreq is 16 bytes of name, then a sockaddr_in.
_SIOCGIFADDR = 0x8915
_IFNAMSIZ = 16


def interface_ipv4(interface: str) -> str:
    """This node's IPv4 address on ``interface`` (its primary one), asked of the kernel (Linux).

    Raises LookupError naming the interface and the fix when it does not exist or has no IPv4 address.
    """
    name = interface.encode()
    if not name or len(name) >= _IFNAMSIZ:
        raise LookupError(f"{interface!r} is not a network interface name (1 to {_IFNAMSIZ - 1} bytes)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            ifreq = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name))
        except OSError as exc:
            here = socket.gethostname()
            if exc.errno == errno.ENODEV:
                raise LookupError(
                    f"there is no network interface {interface!r} on this node ({here}); set "
                    "cluster.network_interface to the NIC the nodes reach each other on (`ip -4 -br addr` "
                    "lists them)"
                ) from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LookupError(
                    f"network interface {interface!r} has no IPv4 address on this node ({here}); give it one "
                    f"(`ip addr add ADDR/PREFIX dev {interface}`) or set cluster.network_interface to the NIC "
                    "the nodes reach each other on (`ip -4 -br addr` lists them)"
                ) from exc
            raise LookupError(f"cannot read the IPv4 address of {interface!r}: {exc}") from exc
    return socket.inet_ntoa(ifreq[20:24])


def resolve_ipv4(host: str) -> list[str]:
    """The IPv4 addresses ``host`` (a name or an address) resolves to here; LookupError when none."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise LookupError(
            f"host {host!r} does not resolve to an IPv4 address on this node: {exc}; list the nodes by "
            "address or fix their /etc/hosts or DNS entries"
        ) from exc
    return sorted({info[4][0] for info in infos})


def is_local_ipv4(address: str) -> bool:
    """Whether ``address`` belongs to this node (in this network namespace): only then can it be bound.

    Binding is the kernel's own answer, secondary addresses and every interface included.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def is_loopback(address: str) -> bool:
    """Whether ``address`` is a loopback address (127.0.0.0/8), reachable from this node only."""
    return ipaddress.ip_address(address).is_loopback
