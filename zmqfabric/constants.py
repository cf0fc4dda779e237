"""Every default of the fabric in one place, each with the reason for its value.

Tests and embedders may pass other values through :class:`zmqfabric.config.NodeConfig`;
nothing reads these names at call time except as defaults.
"""

from __future__ import annotations

# --- wire -----------------------------------------------------------------------------------
#: Protocol version carried in every header; a peer speaking another version is refused.
PROTOCOL_VERSION = 1
#: Largest message (all frames) a socket accepts; ZeroMQ drops the peer before reading more.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Headers are small by design; a bigger one is hostile or a bug.
MAX_HEADER_SIZE = 4096
#: Topics are prefixes for ZeroMQ's filter, not payload.
MAX_TOPIC_SIZE = 1024
#: Bodies at least this long that are bytes go out as a raw frame without a copy.
ZERO_COPY_THRESHOLD = 64 * 1024

# --- sockets --------------------------------------------------------------------------------
#: Closing never blocks longer than this (ms) waiting for unsent messages.
LINGER_MS = 500
#: Queue depth per peer before PUB drops / PUSH blocks: bounded memory, generous for bursts.
HWM = 10_000
#: ZeroMQ heartbeat: a silent TCP peer is dropped after TIMEOUT even without a FIN.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1_500
HEARTBEAT_TTL_MS = 3_000
#: Reconnect quickly on loopback/LAN; back off to 2 s for peers that stay away.
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 2_000

# --- discovery ------------------------------------------------------------------------------
#: DNS-SD service type that every node registers.
SERVICE_TYPE = "_zmqfabric._tcp.local."
#: Record TTL (s): short, so a node that died without a goodbye expires from caches.
RECORD_TTL_S = 15
#: Registering our record is local work in zeroconf's loop; more than this means it is stuck.
REGISTER_TIMEOUT_S = 5.0
#: After advertising, a node listens this long (s) for another live node of its name. Peers
#: introduce themselves over ZeroMQ within milliseconds; mDNS answers take 20-120 ms.
CONFLICT_WINDOW_S = 0.2
#: With on_conflict="suffix", names tried after the first: name-2 ... name-(1+this).
MAX_NAME_SUFFIX = 8
#: How long a browser waits for a peer's full record (SRV/TXT/A) after seeing its name.
RESOLVE_TIMEOUT_S = 1.0
#: Largest TXT value we write or accept (a DNS character-string is at most 255 bytes).
MAX_TXT_VALUE = 250
#: Refused peers remembered for `ls` (bounded: a hostile LAN can advertise without end).
MAX_REFUSED_KEPT = 256
#: Most endpoints one record may carry (bounded record size; a larger record is refused).
MAX_ENDPOINTS = 128

#: An introduction (hello) to a newcomer gets this long (ms) to leave before its socket closes.
HELLO_LINGER_MS = 250
#: Largest hello body we accept (a TXT record's worth of text and some).
MAX_HELLO_SIZE = 16 * 1024

#: A peer whose control endpoint we cannot connect to within this (s) is treated as gone.
LIVENESS_CONNECT_TIMEOUT_S = 3.0
#: A peer found dead is still watched this long (s), and comes back if it answers again.
DEAD_FORGET_S = 60.0
#: The control thread checks liveness deadlines this often (ms).
LIVENESS_TICK_MS = 250

#: Seed peers not yet known are greeted again this often (s).
SEED_RETRY_S = 2.0
#: Most control URLs shared or accepted in one peer list.
MAX_SHARED = 256

# --- requests -------------------------------------------------------------------------------
#: A request waits this long (s) for a provider and its answer unless told otherwise.
REQUEST_TIMEOUT_S = 5.0
#: Control-endpoint calls (ping, info, stats) are cheap; fail fast.
CONTROL_TIMEOUT_S = 2.0

# --- lifetimes ------------------------------------------------------------------------------
#: Joining a node-owned thread on close never waits longer than this (s).
THREAD_JOIN_TIMEOUT_S = 5.0
#: Serve loops wake at least this often (ms) to notice a stop request.
POLL_INTERVAL_MS = 200
#: Malformed-input log lines per peer kind and minute (counters keep the exact numbers).
LOG_RATE_PER_MINUTE = 10
