"""Transports: MQTT (paho-mqtt 2.x) for devices and servers, in-process for simulation,
and a broker launcher (Mosquitto or embedded amqtt).

`make_transport(url, client_id)` picks the implementation from the URL:
  mqtt://host:port, mqtts://host:port  -> MqttTransport
  inproc://name                        -> InProcTransport on the process-wide broker `name`
paho's client is imported only when an MQTT transport is used; the in-process broker uses
paho's topic-filter matching (paho-mqtt is a required dependency either way).

Options (keyword arguments) common to both: max_payload_bytes (the broker's per-message limit;
larger payloads are sent as chunks, default 4 MiB), reassembly_max_message_bytes,
reassembly_max_streams_per_sender, reassembly_max_bytes_per_sender, reassembly_max_bytes_total,
reassembly_ttl_s (edgefed.chunking.Reassembler's limits) or reassembler=; for inproc:// the
inbound-queue limits (max_inbound_messages, max_inbound_bytes, inbound_block_timeout) belong
to the named broker, everything else to the client.
"""
from __future__ import annotations

from typing import Any, Optional

from .base import (DEFAULT_MAX_PAYLOAD_BYTES, BrokerUnreachable, Callback, Chunker,
                   ChunkedPublishHandle, NotConnected, PublishHandle, PublishTimeout, Transport,
                   TransportError, topic_matches)
from .inproc import _LIMIT_NAMES, InProcBroker, InProcTransport


def make_transport(url: str, client_id: Optional[str] = None, **kwargs: Any) -> Transport:
    if url.startswith("inproc://"):
        name = url[len("inproc://"):] or "default"
        broker_opts = {k: kwargs.pop(k) for k in ("synchronous",) + _LIMIT_NAMES
                       if k in kwargs}
        return InProcBroker.named(name, **broker_opts).client(client_id, **kwargs)
    from .mqtt import MqttTransport
    return MqttTransport(url, client_id, **kwargs)


def __getattr__(name: str) -> Any:
    # Lazy: simulations need no paho, and `python -m edgefed.transport.broker` must not find
    # its own module already imported by this package.
    if name in ("MqttTransport", "parse_url"):
        from . import mqtt
        return getattr(mqtt, name)
    if name in ("BrokerHandle", "free_port", "start_broker"):
        from . import broker
        return getattr(broker, name)
    raise AttributeError(name)


__all__ = ["Transport", "TransportError", "Chunker", "ChunkedPublishHandle",
           "DEFAULT_MAX_PAYLOAD_BYTES", "BrokerUnreachable", "PublishTimeout", "NotConnected",
           "PublishHandle", "Callback", "topic_matches", "InProcBroker", "InProcTransport",
           "MqttTransport", "parse_url", "make_transport", "start_broker", "BrokerHandle",
           "free_port"]
