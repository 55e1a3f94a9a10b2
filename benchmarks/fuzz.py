"""Fuzz every decoder and verifier for N inputs (issue 9 "Proof"; tests/test_fuzz_decoders.py
runs the same properties with hypothesis in CI).

    python benchmarks/fuzz.py [--n 100000] [--seed 0]

Prints one row per target: inputs, rejected with a documented error (and a reason), accepted,
crashes (any other exception, or a documented error without a message) and the slowest input
in ms. Exits 1 on any crash (the first few are printed with a repro)."""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed import protocol as P  # noqa: E402


def messages():
    """One valid message of every type (tests/test_fuzz_decoders.py mutates the same ones)."""
    rd = P.RoundDelta(2, [P.Tensor("seeds", np.array([3], np.uint32)),
                          P.Tensor("coeffs", np.array([0.5], np.float32))])
    return [
        P.RoundPlan(job="j", round=3, method="fedkseed", params={"x": 1, "y": 0.5, "z": "s", "k": 8},
                    tensors=[P.Tensor("seed_probs", np.full(8, 0.125, np.float32))],
                    delta_tensors=[P.Tensor("seeds", np.array([1, 2], np.uint32)),
                                   P.Tensor("coeffs", np.array([0.1, -0.2], np.float32)),
                                   P.Tensor("w", np.ones((2, 3), np.float32))]),
        P.Update(job="j", round=3, device="a", method="fedkseed", msg_id=12345, num_samples=8,
                 tensors=[P.Tensor("seeds", np.array([1, 5, 7], np.uint32)),
                          P.Tensor("scalars", np.array([0.1, -2, 3], np.float32)),
                          P.Tensor("lora.A", np.arange(6, dtype=np.float32).reshape(2, 3))], train_loss=0.7),
        P.Ack(job="j", round=3, device="a", msg_id=12345, status=P.AckStatus.LATE, reason="late"),
        P.Status(job="j", device="a", state="online", round=2, timestamp=1.5, text="héllo"),
        P.SyncRequest(job="j", device="a", from_round=1, request_id=7),
        P.SyncReply(job="j", device="a", from_round=1, to_round=2, request_id=7, rounds=[rd]),
        P.JobState(job="j", round=3, history_from=0, method="fedkseed", params={"done": 1}),
    ]


MSGS = messages()
ENC = [m.encode() for m in MSGS]


def recrc(b: bytearray) -> bytes:
    """Recompute the CRC trailer of an unsigned encoding, so a mutation reaches the parser."""
    if len(b) >= 4:
        struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def rbytes(r: random.Random, n: int) -> bytes:
    return bytes(r.getrandbits(8) for _ in range(n))


class Rejected(Exception):
    """Internal: the target refused the input with a documented error."""


# ----------------------------------------------------------------------------- targets
# each: (rng) -> (input repr for a repro, callable) ; the callable returns on accept, raises a
# documented error on reject

def _decode(data, **kw):
    def run():
        try:
            P.decode(data, **kw)
        except P.ProtocolError as e:
            if not str(e):
                raise AssertionError("ProtocolError without a reason") from e
            raise Rejected(str(e)) from None
    return data, run


def t_decode_random(r):
    return _decode(rbytes(r, r.randint(0, 300)))


def t_decode_header_random_body(r):
    i = r.randrange(len(ENC))
    body = rbytes(r, r.randint(0, 200))
    hdr = bytearray(ENC[i][:P.HEADER.size])
    struct.pack_into("<I", hdr, P.HEADER.size - 4, len(body))
    return _decode(recrc(bytearray(hdr + body + b"\0\0\0\0")))


def t_decode_mutated(r):
    b = bytearray(ENC[r.randrange(len(ENC))])
    for _ in range(r.randint(1, 8)):
        op = r.random()
        p = r.randrange(len(b) + 1)
        if op < 0.6 and p < len(b):
            b[p] = r.getrandbits(8)
        elif op < 0.8:
            b[p:p] = rbytes(r, r.randint(1, 8))
        else:
            del b[p:p + r.randint(1, 8)]
    return _decode(recrc(b) if r.random() < 0.8 else bytes(b))


def t_decode_truncated(r):
    e = ENC[r.randrange(len(ENC))]
    data = e[:r.randrange(len(e))]

    def run():
        try:
            P.decode(data)
        except P.ProtocolError as ex:
            raise Rejected(str(ex)) from None
        raise AssertionError("a truncated message decoded")
    return data, run


_SIGNED = None


def _signed():
    global _SIGNED
    if _SIGNED is None:
        from edgefed.security.signing import DeviceVerifier, ServerVerifier, Signer
        dev, srv = Signer.generate("a"), Signer.generate("server")
        sv, dv = ServerVerifier({"a": dev.public_key()}), DeviceVerifier(srv.public_key())
        _SIGNED = []
        for m in MSGS:
            side = isinstance(m, (P.Update, P.Status, P.SyncRequest))
            s, v = (dev, sv) if side else (srv, dv)
            _SIGNED.append((m.encode(signer=s), v))
    return _SIGNED


def t_verify_mutated(r):
    data, verifier = _signed()[r.randrange(len(MSGS))]
    b = bytearray(data)
    for _ in range(r.randint(1, 4)):
        b[r.randrange(len(b))] ^= r.randint(1, 255)
    if r.random() < 0.7:  # fix the CRC so only the signature can catch it
        body_len = struct.unpack_from("<I", b, P.HEADER.size - 4)[0]
        end = P.HEADER.size + body_len + 4
        if end <= len(b):
            struct.pack_into("<I", b, end - 4, zlib.crc32(bytes(b[:end - 4])))
    if bytes(b) == data:  # edits that cancelled out: change the last signature byte
        b[-1] ^= 0xFF
    bad = bytes(b)

    def run():
        try:
            P.decode(bad, verifier=verifier)
        except P.ProtocolError as e:
            raise Rejected(str(e)) from None
        raise AssertionError("a mutated signed message verified")
    return bad, run


_KEYS = ["text", "label", "instruction", "response", "input", "system", "output", "prompt", "chosen",
         "rejected", "messages", "role", "content", "x"]


def rjson(r, depth=0):
    k = r.random()
    if depth > 2 or k < 0.5:
        return r.choice([None, True, False, r.randint(-2**70, 2**70), r.uniform(-1e9, 1e9), float("nan"),
                         float("inf"), "", "positive", "negative", "x" * r.randint(0, 50),
                         "".join(chr(r.randint(0, 0x2FFF)) for _ in range(r.randint(0, 10)))])
    if k < 0.7:
        return [rjson(r, depth + 1) for _ in range(r.randint(0, 3))]
    if k < 0.85:
        return {"role": r.choice(["user", "assistant", "system", "x"]), "content": rjson(r, depth + 1)}
    return {r.choice(_KEYS): rjson(r, depth + 1) for _ in range(r.randint(0, 4))}


def rline(r):
    k = r.random()
    if k < 0.55:
        return json.dumps({r.choice(_KEYS): rjson(r) for _ in range(r.randint(0, 5))})
    if k < 0.75:
        return json.dumps({"messages": [rjson(r, 1) for _ in range(r.randint(0, 4))]})
    if k < 0.9:
        return json.dumps(rjson(r))
    return rbytes(r, r.randint(0, 40)).decode("latin-1")


_TMP = None


def t_read_records(kind):
    def make(r):
        global _TMP
        if _TMP is None:
            _TMP = tempfile.mkdtemp(prefix="edgefed-fuzz-")
        p = Path(_TMP) / "data.jsonl"
        text = "\n".join(rline(r) for _ in range(r.randint(0, 5))) + "\n"

        def run():
            from edgefed.data import read_records
            p.write_text(text, encoding="utf-8", errors="surrogatepass")
            try:
                read_records(p, kind)
            except ValueError as e:  # DataError is a ValueError
                if p.name not in str(e):
                    raise AssertionError(f"{type(e).__name__} without file:line: {e}") from e
                raise Rejected(str(e)) from None
        return text, run
    return make


def t_mqtt_url(r):
    def part():
        return "".join(r.choice("aZ09:@/?#[]%&=. \x00é+-") for _ in range(r.randint(0, 12)))
    if r.random() < 0.3:
        url = part() * r.randint(1, 4)
    else:
        user = r.choice(["", part() + "@", f"{part()}:{part()}@"])
        host = r.choice(["127.0.0.1", "localhost", "[::1]", "[", "]", "[::1", "h", part()])
        port = r.choice(["", f":{r.randint(-5, 70000)}", ":" + part()])
        q = r.choice(["", "?" + "&".join(f"{r.choice(['ca', 'cert', 'key', 'password_file', 'password', 'x'])}"
                                          f"={part()}" for _ in range(r.randint(0, 3)))])
        url = f"{r.choice(['mqtt', 'mqtts', 'tcp', 'http', ''])}://{user}{host}{port}{q}"

    def run():
        from edgefed.transport import mqtt as M
        errs = []
        try:
            scheme, host, port = M.parse_url(url)
            if not (host and 0 <= port <= 65535):
                raise AssertionError(f"parse_url accepted {url!r} as {(scheme, host, port)}")
        except ValueError as e:
            errs.append(str(e))
        try:
            M.resolve_credentials(url, env={})
        except ValueError as e:
            errs.append(str(e))
        if not isinstance(M.redact_url(url), str):
            raise AssertionError("redact_url did not return a str")
        if errs:
            raise Rejected(errs[0])
    return url, run


_SA = None


def _secagg():
    """One signed secure-aggregation round's messages (5 devices), for mutation."""
    global _SA
    if _SA is None:
        import numpy as np

        from edgefed.security import secagg as S
        from edgefed.security.signing import Signer
        cfg = S.SecAggConfig(job="fz", round=1, length=16, threshold=0, fixed=S.FixedPoint(32, 16), bound=1.0)
        ss = Signer.generate("server")
        sig = {f"d{i}": Signer.generate(f"d{i}") for i in range(5)}
        keys = {d: s.public_key() for d, s in sig.items()}
        srv = S.SecAggServer(cfg, signer=ss, device_keys=keys, graph_seed=1)
        cl = {d: S.SecAggClient(d, cfg, signer=sig[d], server_key=ss.public_key()) for d in sig}
        adv = {d: c.advertise() for d, c in cl.items()}
        for a in adv.values():
            srv.add_advertise(a)
        roster = srv.roster()
        shares = {d: c.share_keys(roster) for d, c in cl.items()}
        for x in shares.values():
            srv.add_shares(x)
        fwd = srv.forward("d0")
        _SA = {"S": S, "cfg": cfg, "ss": ss, "keys": keys, "adv": adv, "roster": roster, "shares": shares,
               "fwd": fwd, "np": np}
    return _SA


def _mutate(r, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(r.randint(1, 6)):
        op, p = r.random(), r.randrange(len(b) + 1)
        if op < 0.7 and p < len(b):
            b[p] ^= r.randint(1, 255)
        elif op < 0.85:
            b[p:p] = rbytes(r, r.randint(1, 8))
        else:
            del b[p:p + r.randint(1, 8)]
    if bytes(b) == data:  # a delete and an insert that cancelled out: still the valid message
        b[-1] ^= 0xFF
    return bytes(b)


def t_secagg_server_mutated(r):
    """A mutated advertisement or share message from a registered device, at a fresh server."""
    sa = _secagg()
    S = sa["S"]
    kind = r.choice(["adv", "shares"])
    src = r.choice(sorted(sa[kind]))
    bad = _mutate(r, sa[kind][src])

    def run():
        srv = S.SecAggServer(sa["cfg"], signer=sa["ss"], device_keys=sa["keys"], graph_seed=1)
        try:
            if kind == "adv":
                srv.add_advertise(bad)
            else:
                for a in sa["adv"].values():
                    srv.add_advertise(a)
                srv.roster()
                srv.add_shares(bad)
        except S.SecAggError as e:
            raise Rejected(str(e)) from None
        raise AssertionError("a mutated signed secure-aggregation message was taken")
    return bad, run


def t_secagg_client_mutated(r):
    """A mutated roster or forward from the server, at a device of the round."""
    sa = _secagg()
    S = sa["S"]
    kind = r.choice(["roster", "fwd"])
    bad = _mutate(r, sa[kind])

    def run():
        c = S.SecAggClient("d0", sa["cfg"], server_key=sa["ss"].public_key())
        try:
            if kind == "roster":
                c.share_keys(bad)
            else:
                c.masked_vector(bad, sa["np"].zeros(16))
        except S.SecAggError as e:
            raise Rejected(str(e)) from None
        raise AssertionError("a mutated signed server message was acted on")
    return bad, run


TARGETS = {
    "decode/random-bytes": t_decode_random,
    "decode/header+random-body": t_decode_header_random_body,
    "decode/mutated": t_decode_mutated,
    "decode/truncated": t_decode_truncated,
    "verify/mutated-signed": t_verify_mutated,
    "read_records/classify": t_read_records("classify"),
    "read_records/sft": t_read_records("sft"),
    "read_records/dpo": t_read_records("dpo"),
    "mqtt/url": t_mqtt_url,
    "secagg/server-mutated": t_secagg_server_mutated,
    "secagg/client-mutated": t_secagg_client_mutated,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="inputs in total, split over the targets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated target names (default: all)")
    args = ap.parse_args(argv)
    names = [n for n in TARGETS if not args.only or n in args.only.split(",")]
    per = max(1, args.n // len(names))
    rows, crashes = [], []
    for ti, name in enumerate(names):
        r = random.Random(args.seed * 1000 + ti)
        rej = acc = bad = 0
        worst = 0.0
        for _ in range(per):
            inp, run = TARGETS[name](r)
            t0 = time.perf_counter()
            try:
                run()
                acc += 1
            except Rejected:
                rej += 1
            except Exception as e:  # noqa: BLE001 - a crash is what we look for
                bad += 1
                if len(crashes) < 10:
                    crashes.append((name, inp, "".join(traceback.format_exception_only(type(e), e)).strip(),
                                    traceback.format_exc(limit=-3)))
            worst = max(worst, (time.perf_counter() - t0) * 1000)
        rows.append((name, per, rej, acc, bad, worst))
    w = max(len(n) for n in names)
    print(f"{'target':<{w}}  {'inputs':>8}  {'rejected':>9}  {'accepted':>9}  {'crashes':>8}  {'max ms':>8}")
    for name, n, rej, acc, bad, worst in rows:
        print(f"{name:<{w}}  {n:>8}  {rej:>9}  {acc:>9}  {bad:>8}  {worst:>8.2f}")
    for name, inp, err, tb in crashes:
        print(f"\nCRASH {name}: {err}\n  input: {inp!r}\n{tb}", file=sys.stderr)
    return 1 if any(r[4] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
