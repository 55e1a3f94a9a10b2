"""Property tests of every decoder and verifier (issue 9 "Proof"): whatever the input, they either
return a value or raise one of their documented error types, and never hang.

* edgefed.protocol.decode, every message type: random bytes, mutated valid encodings (with and
  without a recomputed CRC, so the mutation reaches the body parser), truncations -> ProtocolError
* the signature verifier: a mutated signed message never verifies -> ProtocolError
* edgefed.data.read_records (classify / sft / dpo) on random JSONL lines -> records, or DataError /
  ValueError naming file:line
* the MQTT URL parser (parse_url, resolve_credentials, redact_url) -> ValueError

benchmarks/fuzz.py drives the same targets for many more inputs."""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from edgefed import protocol as P

N = 300
FUZZ = settings(max_examples=N, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:  # one set of sample messages for both fuzzers: the benchmark's
    from fuzz import messages as _messages, recrc as _recrc
finally:
    sys.path.pop(0)

MESSAGES = _messages()
ENCODED = [m.encode() for m in MESSAGES]


def _decode_ok(data: bytes, **kw):
    try:
        return P.decode(data, **kw)
    except P.ProtocolError:
        return None


def test_valid_encodings_round_trip():
    for m, e in zip(MESSAGES, ENCODED):
        assert P.decode(e) == m


@FUZZ
@given(data=st.binary(max_size=512))
def test_decode_random_bytes(data):
    _decode_ok(data)


@FUZZ
@given(i=st.integers(0, len(ENCODED) - 1), data=st.binary(min_size=4, max_size=200))
def test_decode_random_body_with_a_valid_header(i, data):
    """A real header (magic, version, type) announcing the right length, random body, valid CRC."""
    e = ENCODED[i]
    hdr = bytearray(e[:P.HEADER.size])
    struct.pack_into("<I", hdr, P.HEADER.size - 4, len(data))
    _decode_ok(_recrc(bytearray(hdr + data + b"\0\0\0\0")))


@FUZZ
@given(i=st.integers(0, len(ENCODED) - 1), cut=st.integers(0, 10_000))
def test_decode_truncations(i, cut):
    e = ENCODED[i]
    cut %= len(e)
    with pytest.raises(P.ProtocolError):
        P.decode(e[:cut])


@FUZZ
@given(i=st.integers(0, len(ENCODED) - 1),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
       fix_crc=st.booleans())
def test_decode_mutated_encodings(i, edits, fix_crc):
    b = bytearray(ENCODED[i])
    for pos, val in edits:
        b[pos % len(b)] = val
    data = _recrc(b) if fix_crc else bytes(b)
    msg = _decode_ok(data)
    if msg is not None:  # whatever decodes is a valid message that re-encodes to the same bytes
        assert P.decode(msg.encode()) == msg


@FUZZ
@given(i=st.integers(0, len(ENCODED) - 1), pos=st.integers(0, 1 << 20),
       ins=st.binary(min_size=0, max_size=16), delete=st.integers(0, 16))
def test_decode_inserted_and_deleted_bytes(i, pos, ins, delete):
    b = bytearray(ENCODED[i])
    p = pos % (len(b) + 1)
    b[p:p + delete] = ins
    _decode_ok(_recrc(b) if len(b) >= 4 else bytes(b))


# ----------------------------------------------------------------------------- signatures

@pytest.fixture(scope="module")
def signing():
    pytest.importorskip("cryptography")
    from edgefed.security.signing import DeviceVerifier, ServerVerifier, Signer
    dev, srv = Signer.generate("a"), Signer.generate("server")
    sv, dv = ServerVerifier({"a": dev.public_key()}), DeviceVerifier(srv.public_key())
    signed = []
    for m in MESSAGES:
        device_side = isinstance(m, (P.Update, P.Status, P.SyncRequest))
        signer, verifier = (dev, sv) if device_side else (srv, dv)
        data = m.encode(signer=signer)
        assert P.decode(data, verifier=verifier) == m
        signed.append((data, verifier))
    return signed


@FUZZ
@given(i=st.integers(0, len(MESSAGES) - 1),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=4),
       fix_crc=st.booleans())
def test_mutated_signed_messages_never_verify(signing, i, edits, fix_crc):
    data, verifier = signing[i]
    b = bytearray(data)
    for pos, x in edits:
        b[pos % len(b)] ^= x
    if fix_crc:  # recompute the CRC over header + body so only the signature can catch the change
        body_len = struct.unpack_from("<I", b, P.HEADER.size - 4)[0]
        end = P.HEADER.size + body_len + 4
        if end <= len(b):
            struct.pack_into("<I", b, end - 4, zlib.crc32(bytes(b[:end - 4])))
    if bytes(b) == data:
        return
    with pytest.raises(P.ProtocolError):
        P.decode(bytes(b), verifier=verifier)


@FUZZ
@given(i=st.integers(0, len(MESSAGES) - 1), cut=st.integers(1, 200), extra=st.binary(max_size=64))
def test_truncated_or_extended_signed_messages_never_verify(signing, i, cut, extra):
    data, verifier = signing[i]
    for bad in (data[:-min(cut, len(data))], data + extra if extra else data[:-1]):
        with pytest.raises(P.ProtocolError):
            P.decode(bad, verifier=verifier)


# ----------------------------------------------------------------------------- data readers

_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
_json = st.recursive(_json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), c, max_size=4)),
                     max_leaves=12)
_keys = st.sampled_from(["text", "label", "instruction", "response", "input", "system", "output",
                         "prompt", "chosen", "rejected", "messages", "role", "content", "sentence", "x"])
_row = st.dictionaries(_keys, _json, max_size=5)
_line = st.one_of(_row.map(lambda d: json.dumps(d)),
                  st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                                  "content": _json}), max_size=4)
                  .map(lambda m: json.dumps({"messages": m})),
                  _json.map(lambda v: json.dumps(v)),
                  st.text(max_size=60))


def read_records_outcome(path, kind):
    from edgefed.data import DataError, read_records
    try:
        recs = read_records(path, kind)
    except DataError as e:
        assert path.name in str(e), f"DataError without the file name: {e}"
        return "rejected"
    except ValueError as e:
        assert path.name in str(e), f"ValueError without the file name: {e}"
        return "rejected"
    assert recs
    return "accepted"


@FUZZ
@given(kind=st.sampled_from(["classify", "sft", "dpo"]), lines=st.lists(_line, min_size=0, max_size=5))
def test_read_records_random_jsonl(tmp_path_factory, kind, lines):
    d = tmp_path_factory.mktemp("jsonl", numbered=True)
    p = d / "data.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    read_records_outcome(p, kind)


# ----------------------------------------------------------------------------- MQTT URLs

_url_part = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
_url = st.one_of(
    st.text(max_size=80),
    st.builds(lambda s, u, h, port, q: f"{s}://{u}{h}{port}{q}",
              st.sampled_from(["mqtt", "mqtts", "tcp", "http", "", "MQTT"]),
              st.one_of(st.just(""), _url_part.map(lambda x: x + "@"),
                        st.tuples(_url_part, _url_part).map(lambda t: f"{t[0]}:{t[1]}@")),
              st.one_of(st.sampled_from(["127.0.0.1", "localhost", "[::1]", "[", "]", "[::1", "host"]), _url_part),
              st.one_of(st.just(""), st.integers(-5, 70000).map(lambda p: f":{p}"), _url_part.map(lambda x: ":" + x)),
              st.one_of(st.just(""), st.lists(st.tuples(st.sampled_from(
                  ["ca", "cert", "key", "password_file", "password", "x", ""]), _url_part), max_size=3)
                  .map(lambda kv: "?" + "&".join(f"{k}={v}" for k, v in kv)))))


@FUZZ
@given(url=_url)
def test_mqtt_url_parser(url, monkeypatch):
    from edgefed.transport import mqtt as M
    for v in (M.ENV_USERNAME, M.ENV_PASSWORD, M.ENV_PASSWORD_FILE, M.ENV_CA, M.ENV_CERT, M.ENV_KEY):
        monkeypatch.delenv(v, raising=False)
    try:
        scheme, host, port = M.parse_url(url)
        assert scheme in ("mqtt", "mqtts", "tcp") and host and 0 <= port <= 65535
    except ValueError:
        pass
    try:
        M.resolve_credentials(url, env={})
    except ValueError:
        pass
    assert isinstance(M.redact_url(url), str)
