"""HTTP status of a running server (stdlib only, loopback only).

    GET /status    JSON: job config, round, phase, deadline, devices, per-round history, plus
                   one key per entry of the engine's optional `status_extras` dict
                   (name -> callable returning a JSON-able dict; e.g. "evaluation")
    GET /metrics   Prometheus text exposition format (version 0.0.4)
    GET /          a self-contained page (inline JS on a <canvas>, no CDN) polling /status

Bounds: requests run on a fixed pool of `max_workers` threads; a connection that finds every
worker and the `backlog` queue slots busy gets a 503 and is closed at once. Every socket has a
`timeout` (slow or idle clients are dropped), and only requests whose Host header names the bound
address, localhost / 127.0.0.1 / [::1] (with the bound port or none), or one of `allowed_hosts`
are answered: no Host -> 400, another Host -> 421 (DNS-rebinding defence).
"""
from __future__ import annotations

import json
import math
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Iterable, Optional

from edgefed.jsonable import plain

__all__ = ["StatusHTTPServer", "render_metrics", "to_json", "status_json", "allowed_host_headers"]


def to_json(obj: Any) -> bytes:
    return json.dumps(plain(obj), allow_nan=False).encode("utf-8")


def status_json(engine: Any) -> dict:
    """engine.status() plus its optional status_extras (a failing extra reports its error)."""
    st = engine.status()
    for name, fn in dict(getattr(engine, "status_extras", None) or {}).items():
        try:
            st[name] = fn()
        except Exception as e:  # never fail the page for an extra
            st[name] = {"error": repr(e)}
    return st


# (name, kind, help, [(labels, snapshot key)]): the exposition itself is prometheus_client's.
_METRICS = [
    ("edgefed_round", "gauge", "Current (open) round; equals the number of aggregated rounds.", [({}, "round")]),
    ("edgefed_updates_accepted", "counter", "Updates accepted since the server started.", [({}, "accepted")]),
    ("edgefed_updates_late", "counter", "Updates for closed rounds (acked late, not aggregated).", [({}, "late")]),
    ("edgefed_updates_duplicate", "counter", "Re-delivered or second updates (acked again).", [({}, "duplicates")]),
    ("edgefed_devices_online", "gauge", "Devices whose last Status is not offline.", [({}, "devices_online")]),
    ("edgefed_bytes_received", "counter", "Bytes of accepted updates.", [({}, "bytes_received")]),
    ("edgefed_last_round_duration_seconds", "gauge", "Duration of the last aggregated round.",
     [({}, "last_round_duration")]),
    ("edgefed_train_loss", "gauge", "Sample-weighted mean train loss of the last aggregated round.",
     [({}, "train_loss")]),
    ("edgefed_round_extensions", "counter", "Deadlines extended for lack of quorum.", [({}, "extensions")]),
    ("edgefed_sync_replies", "counter", "Sync replies sent (delta or full).", [({}, "sync_replies")]),
    ("edgefed_store_errors", "counter", "Batches whose commit failed (not acked).", [({}, "store_errors")]),
    ("edgefed_devices_registered", "gauge", "Devices registered for the job (max_devices caps it).",
     [({}, "devices_registered")]),
    ("edgefed_devices_refused", "counter", "Statuses/updates of new devices refused past max_devices.",
     [({}, "devices_refused")]),
    ("edgefed_inbound_queued_bytes", "gauge", "Bytes taken from the transport, not yet handled.",
     [({}, "inbound_bytes")]),
    ("edgefed_inbound_peak_bytes", "gauge", "Peak of edgefed_inbound_queued_bytes.", [({}, "inbound_peak_bytes")]),
    ("edgefed_inbound_budget_bytes", "gauge", "Byte budget of the inbound queue.", [({}, "inbound_budget_bytes")]),
    ("edgefed_inbound_dropped", "counter", "Messages dropped (not acked) because the inbound queue was full.",
     [({}, "inbound_dropped")]),
    ("edgefed_updates_stored", "counter", "Late/duplicate updates stored, by kind and how.",
     [({"kind": "late", "how": "raw"}, "late_raw_stored"), ({"kind": "late", "how": "digest"}, "late_digest_stored"),
      ({"kind": "late", "how": "not_stored"}, "late_not_stored"),
      ({"kind": "duplicate", "how": "digest"}, "duplicates_digest_stored"),
      ({"kind": "duplicate", "how": "not_stored"}, "duplicates_not_stored")]),
    ("edgefed_log_lines_suppressed", "counter", "Client-caused log lines suppressed by rate limiting.",
     [({}, "log_lines_suppressed")]),
    ("edgefed_device_errors", "counter", "Error statuses from devices (a failed step, NaN loss, bad delta).",
     [({}, "device_errors")]),
    ("edgefed_secagg_restarts", "counter", "Secure-aggregation attempts that failed and were redone.",
     [({}, "secagg_restarts")]),
    ("edgefed_secagg_rejected", "counter", "Secure-aggregation stage messages rejected.", [({}, "secagg_rejected")]),
]


def _value(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class _SnapshotCollector:
    """Server.metrics_snapshot() as Prometheus metric families, labelled by job."""

    def __init__(self, m: dict):
        self.m = m

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
        m, job = self.m, str(self.m.get("job", ""))
        for name, kind, help_, samples in _METRICS:
            keys = ["job", *samples[0][0].keys()]
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_, labels=keys)
            for labels, key in samples:
                fam.add_metric([job, *labels.values()], _value(m.get(key, 0)))
            yield fam
        rej = CounterMetricFamily("edgefed_updates_rejected",
                                  "Messages rejected since the server started, by reason class.",
                                  labels=["job", "reason"])
        for reason, n in sorted((m.get("rejected") or {"none": 0}).items()):
            rej.add_metric([job, str(reason)], _value(n))
        yield rej
        dur = SummaryMetricFamily("edgefed_round_duration_seconds", "Plan published -> round aggregated.",
                                  labels=["job"])
        dur.add_metric([job], count_value=_value(m.get("round_duration_count", 0)),
                       sum_value=_value(m.get("round_duration_sum", 0.0)))
        yield dur
        if "dp_epsilon" in m:  # differential privacy: the budget spent so far, at the job's delta
            eps = GaugeMetricFamily("edgefed_dp_epsilon", "Epsilon spent after the aggregated rounds, at dp_delta.",
                                    labels=["job", "mode", "delta"])
            eps.add_metric([job, str(m.get("dp_mode", "")), repr(float(m.get("dp_delta", 0.0)))],
                           _value(m["dp_epsilon"]))
            yield eps


def render_metrics(m: dict) -> str:
    """Prometheus text format from Server.metrics_snapshot() (prometheus_client's exposition)."""
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_SnapshotCollector(m))
    return generate_latest(reg).decode("utf-8")


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EdgeFed server</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} .muted{color:#777}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:.8em 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .9em;min-width:8em}
.card b{display:block;font-size:1.4em}
canvas{background:#fff;border:1px solid #ddd;border-radius:6px;margin:.3em .6em .3em 0}
table{border-collapse:collapse;background:#fff;margin-top:.8em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
.off{color:#b00}.on{color:#080}
</style></head><body>
<h1>EdgeFed &mdash; <span id="job">job</span></h1>
<div class="muted" id="sub">connecting&hellip;</div>
<div class="cards">
 <div class="card">round<b id="round">-</b></div><div class="card">phase<b id="phase">-</b></div>
 <div class="card">updates this round<b id="acc">-</b></div><div class="card">devices online<b id="online">-</b></div>
 <div class="card">deadline in<b id="deadline">-</b></div><div class="card">last loss<b id="loss">-</b></div>
</div>
<canvas id="c_loss" width="560" height="260"></canvas><canvas id="c_upd" width="560" height="260"></canvas>
<table id="devs"><thead><tr><th>device</th><th>state</th><th>class</th><th>round</th><th>last seen</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
function chart(id, title, xs, ys, color, bars){
  const c=document.getElementById(id), g=c.getContext("2d"), W=c.width, H=c.height, L=52, R=12, T=26, B=30;
  g.clearRect(0,0,W,H); g.fillStyle="#222"; g.font="13px sans-serif"; g.fillText(title, L, 16);
  const pts=[]; for(let i=0;i<xs.length;i++){ if(ys[i]!==null&&isFinite(ys[i])) pts.push([xs[i],ys[i]]); }
  g.strokeStyle="#999"; g.beginPath(); g.moveTo(L,T); g.lineTo(L,H-B); g.lineTo(W-R,H-B); g.stroke();
  if(!pts.length){ g.fillStyle="#999"; g.fillText("no rounds yet", L+10, H/2); return; }
  let x0=Math.min(...pts.map(p=>p[0])), x1=Math.max(...pts.map(p=>p[0]));
  let y0=Math.min(...pts.map(p=>p[1])), y1=Math.max(...pts.map(p=>p[1]));
  if(bars) y0=0; if(x1===x0){x0-=1;x1+=1;} if(y1===y0){y1+=Math.abs(y1)*0.1+1; if(!bars) y0-=Math.abs(y0)*0.1+1;}
  const sx=x=>L+(x-x0)/(x1-x0)*(W-L-R-10)+5, sy=y=>H-B-(y-y0)/(y1-y0)*(H-T-B);
  g.fillStyle="#555"; g.font="11px sans-serif";
  for(let k=0;k<=4;k++){ const y=y0+(y1-y0)*k/4; g.fillText((Math.abs(y)>=1000?y.toExponential(1):+y.toPrecision(3)).toString(),4,sy(y)+4);
    g.strokeStyle="#eee"; g.beginPath(); g.moveTo(L+1,sy(y)); g.lineTo(W-R,sy(y)); g.stroke(); }
  g.fillText("round "+x0, L, H-10); g.fillText(""+x1, W-R-20, H-10);
  g.strokeStyle=color; g.fillStyle=color;
  if(bars){ const w=Math.max(2,(W-L-R)/(pts.length+1)*0.7); for(const p of pts) g.fillRect(sx(p[0])-w/2, sy(p[1]), w, H-B-sy(p[1])); }
  else { g.lineWidth=2; g.beginPath(); pts.forEach((p,i)=>i?g.lineTo(sx(p[0]),sy(p[1])):g.moveTo(sx(p[0]),sy(p[1]))); g.stroke();
    for(const p of pts){ g.beginPath(); g.arc(sx(p[0]),sy(p[1]),2.5,0,7); g.fill(); } g.lineWidth=1; }
}
function txt(id,v){ document.getElementById(id).textContent=v; }
async function tick(){
  try{
    const s=await (await fetch("status",{cache:"no-store"})).json();
    txt("job", s.job.job+" ("+s.job.method+")"); txt("round", s.round+" / "+s.rounds); txt("phase", s.phase);
    txt("acc", s.accepted_this_round+" / "+s.target); txt("online", s.devices_online);
    txt("deadline", s.done?"-":(s.deadline_in_s).toFixed(1)+" s");
    const h=s.history||[]; const last=h.length?h[h.length-1]:null;
    txt("loss", last&&last.train_loss!==null?last.train_loss.toFixed(4):"-");
    txt("sub", "model "+(s.model||"-")+" \u00b7 accepted "+s.metrics.accepted+" \u00b7 late "+s.metrics.late+
        " \u00b7 digest "+(s.digest||"-").slice(0,16)+" \u00b7 updated "+new Date().toLocaleTimeString());
    chart("c_loss","train loss (sample-weighted mean)",h.map(r=>r.round),h.map(r=>r.train_loss),"#1f6fd0",false);
    chart("c_upd","accepted updates per round",h.map(r=>r.round),h.map(r=>r.n_updates),"#2a9d55",true);
    const tb=document.querySelector("#devs tbody"); tb.innerHTML="";
    for(const d of s.devices){ const tr=document.createElement("tr");
      for(const v of [d.device,d.state,d.device_class||"-",d.round,new Date(d.last_seen*1000).toLocaleTimeString()]){
        const td=document.createElement("td"); td.textContent=v; tr.appendChild(td); }
      tr.children[1].className=d.online?"on":"off"; tb.appendChild(tr); }
  }catch(e){ txt("sub","status unavailable: "+e); }
}
tick(); setInterval(tick, 2000);
</script></body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    server_version = "EdgeFed"
    protocol_version = "HTTP/1.1"
    timeout = 5.0  # socket timeout (StreamRequestHandler applies it); overridden per server

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # type: ignore[attr-defined]
        super().setup()

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet; the engine logs what matters
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _host_ok(self) -> bool:
        host = self.headers.get("Host")
        if host is None or len(self.headers.get_all("Host") or []) != 1:
            self.close_connection = True
            self._send(400, b"a single Host header is required\n", "text/plain")
            return False
        if host.strip().lower() not in self.server.allowed_hosts:  # type: ignore[attr-defined]
            self.close_connection = True
            self._send(421, b"misdirected request: this status server answers only its own "
                            b"address (Host: 127.0.0.1 or localhost)\n", "text/plain")
            return False
        return True

    def do_GET(self) -> None:
        engine = self.server.engine  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if not self._host_ok():
            return
        try:
            if path == "/status":
                self._send(200, to_json(status_json(engine)), "application/json")
            elif path == "/metrics":
                self._send(200, render_metrics(engine.metrics_snapshot()).encode(),
                           "text/plain; version=0.0.4; charset=utf-8")
            elif path in ("/", "/index.html"):
                self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found: try /, /status or /metrics\n", "text/plain")
        except Exception as e:  # never take the server down for a status page
            self._send(500, f"error: {e!r}\n".encode(), "text/plain")

    do_HEAD = do_GET


class _PoolHTTPServer(HTTPServer):
    """HTTPServer whose requests run on a fixed ThreadPoolExecutor, admitted by a semaphore of
    max_workers + backlog slots; a connection past that gets a 503 and is closed."""

    daemon_threads = True

    def __init__(self, addr: tuple, handler: type, max_workers: int, backlog: int):
        super().__init__(addr, handler)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="edgefed-http")
        self.slots = threading.BoundedSemaphore(max_workers + backlog)
        self.refused = 0

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            self.pool.submit(self._work, request, client_address)
        except RuntimeError:  # pool shut down
            self.slots.release()
            self.shutdown_request(request)

    def _work(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # timeouts and resets of clients are not the server's problem

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def allowed_host_headers(host: str, port: int, extra: Iterable[str] = ()) -> frozenset:
    """Host header values (lower case) the status server answers."""
    names = {host, "127.0.0.1", "localhost", "[::1]"}
    names |= {h.strip().lower() for h in extra if h.strip()}
    out = set()
    for n in names:
        n = n.lower()
        out.add(n)
        if not n.rsplit(":", 1)[-1].isdigit() or n.endswith("]"):
            out.add(f"{n}:{port}")
    return frozenset(out)


class StatusHTTPServer:
    """HTTP server on host:port (port 0 picks a free one; see .port) in a daemon thread, with a
    bounded worker pool, socket timeouts and a Host-header check (module docstring)."""

    def __init__(self, engine: Any, port: int = 0, host: str = "127.0.0.1", *,
                 allowed_hosts: Iterable[str] = (), max_workers: int = 4, backlog: int = 8,
                 timeout: float = 5.0):
        self.engine = engine
        self.host = host
        self._httpd = _PoolHTTPServer((host, int(port)), _Handler, max(1, int(max_workers)),
                                      max(0, int(backlog)))
        self._httpd.engine = engine  # type: ignore[attr-defined]
        self._httpd.socket_timeout = float(timeout)  # type: ignore[attr-defined]
        self.port: int = self._httpd.server_address[1]
        self._httpd.allowed_hosts = allowed_host_headers(host, self.port, allowed_hosts)  # type: ignore[attr-defined]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "StatusHTTPServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgefed-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()
