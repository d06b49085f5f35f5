"""The coordinator's hand on the SuperLink's Control API (on loopback): node registration and runs.

Registration follows the provisioning folder: every declared, unrevoked hospital's node key is
registered; a revoked hospital's key is unregistered, so its SuperNode is refused even if it still
holds a valid-looking certificate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flwr.proto.control_pb2 import (  # type: ignore[attr-defined]
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StopRunRequest,
    StreamLogsRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from certs.keys import load_openssh_public_key, public_key_fingerprint
from certs.participants import load_participants
from certs.store import CertStore
from server.ops.superlink import LOOPBACK


@dataclass(frozen=True)
class NodeInfo:
    """A SuperNode as the SuperLink knows it."""

    node_id: int
    name: str
    status: str
    key_fingerprint: str


@dataclass(frozen=True)
class RunInfo:
    """A run as the SuperLink knows it."""

    run_id: int
    status: str
    sub_status: str
    details: str
    fab_id: str
    running_at: str
    finished_at: str
    bytes_sent: int
    bytes_recv: int
    clientapp_runtime: float


@dataclass
class SyncReport:
    """What `sync_registrations` changed."""

    registered: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)


def _fingerprint_of_pem(pem: str | bytes) -> str:
    key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return public_key_fingerprint(key)


class ControlPlane:
    """A Control API client for the loopback SuperLink (only the coordinator's host can reach it)."""

    def __init__(self, port: int, store: CertStore) -> None:
        self._client = ControlHttpClient.from_server_address(
            f"{LOOPBACK}:{port}",
            False,
            store.ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def nodes(self) -> list[NodeInfo]:
        response = self._client.ListNodes(ListNodesRequest())
        return [NodeInfo(n.node_id, n.name, n.status, _fingerprint_of_pem(n.public_key)) for n in response.nodes_info]

    def register(self, name: str, public_key: ec.EllipticCurvePublicKey) -> int:
        response = self._client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(public_key), name=name))
        return int(response.node_id)

    def unregister(self, node_id: int) -> None:
        self._client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def runs(self, run_id: int = 0) -> list[RunInfo]:
        response = self._client.ListRuns(ListRunsRequest(run_id=run_id) if run_id else ListRunsRequest())
        result = []
        for run in response.run_dict.values():
            result.append(
                RunInfo(
                    run_id=int(run.run_id),
                    status=run.status.status,
                    sub_status=run.status.sub_status,
                    details=run.status.details,
                    fab_id=run.fab_id,
                    running_at=run.running_at,
                    finished_at=run.finished_at,
                    bytes_sent=int(run.bytes_sent),
                    bytes_recv=int(run.bytes_recv),
                    clientapp_runtime=float(run.clientapp_runtime),
                )
            )
        return sorted(result, key=lambda r: r.running_at or "")

    def stop_run(self, run_id: int) -> None:
        self._client.StopRun(StopRunRequest(run_id=run_id))

    def server_log(self, run_id: int) -> str:
        """The ServerApp's log of a run so far, as the SuperLink keeps it (what `flwr log --show` prints).

        Flower streams it: the first chunk holds everything logged until now; for a finished run the
        stream then ends, for a running one it would go on, so only the first chunk is read."""
        stream = self._client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0))
        try:
            return str(next(stream).log_output)
        except StopIteration:
            return ""
        finally:
            stream.close()


def sync_registrations(control: ControlPlane, store: CertStore) -> SyncReport:
    """Register every declared, unrevoked hospital's node key; unregister revoked keys."""
    participants = load_participants(store.participants)
    revoked = store.read_revoked()
    revoked_keys = {fp for record in revoked.values() for fp in record.node_key_fingerprints}
    report = SyncReport()
    known = {node.key_fingerprint: node for node in control.nodes()}
    for fingerprint, node in known.items():
        if fingerprint in revoked_keys and node.status != "unregistered":
            control.unregister(node.node_id)
            report.unregistered.append(node.name or str(node.node_id))
    for hospital in participants.hospitals:
        if hospital.name in revoked:
            continue
        node_pub = store.hospital(hospital.name).node_pub
        if not node_pub.exists():
            continue
        key = load_openssh_public_key(node_pub)
        fingerprint = public_key_fingerprint(key)
        existing = known.get(fingerprint)
        if existing is not None and existing.status != "unregistered":
            report.already.append(hospital.name)
            continue
        control.register(hospital.name, key)
        report.registered.append(hospital.name)
    return report
