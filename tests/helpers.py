"""Small helpers shared by the test modules (pytest puts tests/ on sys.path)."""
import threading
import time


def wait_for(pred, timeout=10.0, step=0.02):
    """Poll pred() until it is true or timeout seconds passed; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def wait_until(cond, timeout=10.0, what="condition", poll=0.005):
    """wait_for that fails the test: an AssertionError naming `what` after timeout seconds."""
    if not wait_for(cond, timeout, poll):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


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


class Inbox:
    """A transport callback that records (topic, payload); thread-safe, since transports call
    it from their network threads."""

    def __init__(self):
        self.items, self.lock = [], threading.Lock()

    def __call__(self, topic, payload):
        with self.lock:
            self.items.append((topic, payload))

    def topics(self):
        with self.lock:
            return [t for t, _ in self.items]

    def payloads(self, topic=None):
        with self.lock:
            return [p for t, p in self.items if topic is None or t == topic]

    def decoded(self):
        """The non-empty payloads as protocol messages (an empty retained payload clears a topic)."""
        from edgefed import protocol as P
        return [P.decode(p) for p in self.payloads() if p]


def broker_auth_files(directory, job, other_job, devices=("d1", "d2")):
    """`edgefed certs` output for `job` in `directory`, plus a server user of `other_job` in the
    same password file and ACL (one broker, two jobs): the dict `generate` returns, with the
    other server's password under "other_password"."""
    from edgefed.security import broker_auth as BA
    from edgefed.security.certs import generate

    info = generate(str(directory), job, list(devices))
    other_pw = BA.new_password()
    with open(f"{directory}/passwd", "a") as f:
        f.write(BA.password_file_text({BA.server_username(other_job): other_pw}))
    with open(f"{directory}/acl", "a") as f:
        f.write("\n" + "\n".join([f"user {BA.server_username(other_job)}", *BA.server_acl(other_job)]) + "\n")
    info["other_password"] = other_pw
    return info


def broker_identity(sec, name):
    """MqttTransport keyword arguments for identity `name` (server or a device id) of `sec`."""
    crt, key = sec["certs"][name]
    return dict(username=sec["users"][name], password_file=str(sec["credentials"][name]),
                ca=str(sec["ca"]), cert=str(crt), key=str(key))
