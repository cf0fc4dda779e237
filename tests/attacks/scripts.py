"""The programs of the attack suite: victims and clients (zmqfabric) and a hostile process
written with raw pyzmq, msgpack and python-zeroconf only, knowing only public keys.

Each is Python source run with ``python -c`` inside a network namespace; ``{...}`` fields are
filled with ``str.format``. Every loop is bounded in count and time.
"""

#: Shared by victims and clients: report a JSON line, the process's RSS (VmHWM is the peak).
PRELUDE = """
import json, os, sys, threading, time
def out(**kw):
    print(json.dumps(kw), flush=True)
"""

#: A secured (or open) victim: services echo and admin, a publisher "ticks" (open only).
VICTIM = PRELUDE + """
import zmqfabric as zf
node = zf.Node({name!r}, keys={keys!r}, fabric={fabric!r})
@node.reply("echo")
def echo(body):
    return {{"by": "echo", "body": body}}
@node.reply("admin")
def admin(body):
    return {{"by": "admin"}}
node.start()
rec = node.record
ports = {{f"{{ep.kind.value}}:{{ep.name}}": ep.port for ep in rec.endpoints}}
pub = node.publisher("ticks") if {publish!r} else None
if pub is not None:
    ports["pub:ticks"] = node.record.find(zf.EndpointKind.STREAM, "ticks").port
out(ports=ports, id=node.node_id, key=rec.curve_key, pid=os.getpid())
print("READY", flush=True)
stop = time.monotonic() + 240
def tick():
    while time.monotonic() < stop and not node.state.value == "closed":
        pub.send("t", {{"n": 1}})
        time.sleep(0.05)
if pub is not None:
    threading.Thread(target=tick, daemon=True).start()
node.run(timeout=240)
node.close()
"""

#: A client calling "echo" every 10 ms (1 s timeout), reporting cumulative counts every 0.25 s;
#: and (open fabric) a subscriber of "ticks" counting events.
CLIENT = PRELUDE + """
import zmqfabric as zf
node = zf.Node({name!r}, keys={keys!r}, fabric={fabric!r})
node.start()
node.wait_for_endpoint("rep", "echo", 20)
counts = {{"ok": 0, "fail": 0, "admin": 0, "events": 0, "errors": {{}}}}
if {subscribe!r}:
    def listen():
        sub = node.subscribe("ticks")
        end = time.monotonic() + 240
        while time.monotonic() < end:
            try:
                if sub.recv_message(timeout=0.5) is not None:
                    counts["events"] += 1
            except zf.FabricError:
                pass
    threading.Thread(target=listen, daemon=True).start()
node.request("echo", "warm", timeout=10)
out(pid=os.getpid())
print("READY", flush=True)
end, last = time.monotonic() + 240, 0.0
while time.monotonic() < end:
    try:
        reply = node.request("echo", "x", timeout=1.0)
        if reply.get("by") == "echo":
            counts["ok"] += 1
        else:
            counts["admin"] += 1
    except zf.FabricError as exc:
        counts["fail"] += 1
        kind = type(exc).__name__
        counts["errors"][kind] = counts["errors"].get(kind, 0) + 1
    now = time.monotonic()
    if now - last >= 0.25:
        last = now
        out(t=now, **counts)
    time.sleep(0.01)
"""

#: The hostile process's helpers: forge mDNS records with zeroconf pinned to its own address.
ATTACKER = """
import json, os, signal, socket, sys, threading, time
import msgpack, zmq
from zeroconf import IPVersion, ServiceInfo, Zeroconf
TYPE = "_zmqfabric._tcp.local."
ME = {me!r}
def out(**kw):
    print(json.dumps(kw), flush=True)
def txt(node_id, endpoints, key=None, seq=1, fabric="sec", host="evil"):
    t = {{"v": "1", "id": node_id, "host": host, "pid": "4242", "seq": str(seq), "fab": fabric,
         "e0": ";".join(endpoints)}}
    if key:
        t["ck"] = key
    return t
def info(name, node_id, address, ctl_port, props):
    return ServiceInfo(TYPE, f"{{name}}@{{node_id}}.{{TYPE}}", port=ctl_port, properties=props,
                       server=f"zf-{{node_id}}.local.", addresses=[socket.inet_aton(address)],
                       host_ttl=60, other_ttl=60)
def zeroconf():
    return Zeroconf(interfaces=[ME], ip_version=IPVersion.V4Only)
def hdr(kind, msg_id, headers=None):
    # A header frame (protocol version 2, the kind with the FOLLOWS bit): a body frame follows.
    return msgpack.packb([2, kind | 16, msg_id, time.time()] + ([headers] if headers else []))
def hold(seconds=60):
    # Keep what this process advertises or holds open until the test ends it (SIGTERM, or
    # SIGKILL: a hostile process does not clean up), at most seconds.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    signal.sigtimedwait([signal.SIGTERM], seconds)
    os._exit(0)
"""
