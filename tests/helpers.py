"""Small helpers shared by the test modules (pytest puts tests/ on sys.path)."""
import time


def wait_for(pred, timeout=10.0, step=0.02):
    """Poll pred() until it is true or timeout seconds passed; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def mqtt_clients(defaults, **close_kw):
    """Body of a `clients` fixture: yields make(url, client_id=None, **kw), an MqttTransport
    factory with these defaults whose transports are all closed afterwards."""
    from edgefed.transport.mqtt import MqttTransport

    made = []

    def make(url, client_id=None, **kw):
        c = MqttTransport(url, client_id, **{**defaults, **kw})
        made.append(c)
        return c

    yield make
    for c in made:
        c.close(**close_kw)


def started_broker(kind, **kw):
    """Body of a `broker` fixture: a broker of this kind ("mosquitto" / "embedded"), stopped after."""
    from edgefed.transport.broker import start_broker

    h = start_broker(prefer=kind, **kw)
    assert h.kind == kind
    yield h
    h.stop()
