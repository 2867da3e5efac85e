"""The baseline: a bare grpc.aio server that does no registry work at all.

It serves ``registry.v1.RegistryService/Heartbeat``, ``/SelectNodes`` and ``/Schedule``
with the very message types the sidecar uses (so the same client stub drives both),
through ``grpc.method_handlers_generic_handler``. A heartbeat is answered with a response
of the sidecar's shape carrying the same seq; a SelectNodes request gets a canned response
captured from a real sidecar, so both sides serialize a message of the same size; a
Schedule request (whatever its job id) gets one canned ScheduleResponse captured the same
way. What the sidecar does beyond this is the registry's own work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from registry_client.v1 import registry_pb2 as pb

SERVICE = "registry.v1.RegistryService"
INTERVAL_MS = 3333
TTL_MS = 10_000
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]
"""The sidecar's own server options, so transport settings do not differ."""


def handler(
    canned: Mapping[bytes, bytes], schedule: bytes = b""
) -> grpc.GenericRpcHandler[Any, Any]:
    """Heartbeat echo, canned SelectNodes (keyed by the serialized request) and one canned
    ScheduleResponse for every Schedule request."""
    responses = {key: pb.SelectNodesResponse.FromString(raw) for key, raw in canned.items()}
    empty = pb.SelectNodesResponse()
    scheduled = pb.ScheduleResponse.FromString(schedule)

    async def heartbeat(
        requests: AsyncIterator[pb.HeartbeatRequest], context: Any
    ) -> AsyncIterator[pb.HeartbeatResponse]:
        async for req in requests:
            yield pb.HeartbeatResponse(
                seq=req.seq,
                version=req.seq,
                status=pb.NODE_STATUS_ONLINE,
                action=pb.HEARTBEAT_ACTION_CONTINUE,
                deadline_ms=int(time.time() * 1000) + TTL_MS,
                interval_ms=INTERVAL_MS,
            )

    async def select_nodes(request: pb.SelectNodesRequest, context: Any) -> pb.SelectNodesResponse:
        return responses.get(request.SerializeToString(deterministic=True), empty)

    async def schedule_job(request: pb.ScheduleRequest, context: Any) -> pb.ScheduleResponse:
        return scheduled

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Heartbeat": grpc.stream_stream_rpc_method_handler(
                heartbeat,
                request_deserializer=pb.HeartbeatRequest.FromString,
                response_serializer=pb.HeartbeatResponse.SerializeToString,
            ),
            "SelectNodes": grpc.unary_unary_rpc_method_handler(
                select_nodes,
                request_deserializer=pb.SelectNodesRequest.FromString,
                response_serializer=pb.SelectNodesResponse.SerializeToString,
            ),
            "Schedule": grpc.unary_unary_rpc_method_handler(
                schedule_job,
                request_deserializer=pb.ScheduleRequest.FromString,
                response_serializer=pb.ScheduleResponse.SerializeToString,
            ),
        },
    )


@contextlib.asynccontextmanager
async def serving(
    canned: Mapping[bytes, bytes] | None = None, schedule: bytes = b""
) -> AsyncIterator[str]:
    """Serve on a free loopback port; yields ``host:port``."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler(canned or {}, schedule),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0.5)
