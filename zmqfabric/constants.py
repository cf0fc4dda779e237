"""Every default of the fabric in one place, each with the reason for its value.

Tests and embedders may pass other values through :class:`zmqfabric.config.NodeConfig`;
nothing reads these names at call time except as defaults.
"""

from __future__ import annotations

# --- wire -----------------------------------------------------------------------------------
#: Protocol version carried in every header; a peer speaking another version is refused.
PROTOCOL_VERSION = 1
#: Largest frame a socket accepts (ZeroMQ applies MAXMSGSIZE to each frame); a peer that sends
#: more is disconnected before the frame is read into memory.
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
#: The fabric a node joins unless told otherwise; nodes of other fabrics are invisible to it.
DEFAULT_FABRIC = "default"
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
#: A starting node's legacy unicast query (discovery/quickquery.py) takes answers this long (s):
#: responders answer it at once, so this only has to outlast a slow or loaded host.
QUICK_QUERY_WINDOW_S = 2.0
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
#: The housekeeping thread checks liveness deadlines this often (ms).
LIVENESS_TICK_MS = 250

#: Seed peers not yet known are greeted again this often (s).
SEED_RETRY_S = 2.0
#: Most control URLs shared or accepted in one peer list.
MAX_SHARED = 256

# --- requests -------------------------------------------------------------------------------
#: A request waits this long (s) for a provider and its answer unless told otherwise.
REQUEST_TIMEOUT_S = 5.0
#: Idle requester sockets an asyncio node keeps per service for concurrent calls.
MAX_IDLE_REQUESTERS = 8
#: Control-endpoint calls (ping, info, stats) are cheap; fail fast.
CONTROL_TIMEOUT_S = 2.0

# --- lifetimes ------------------------------------------------------------------------------
#: Joining a node-owned thread on close never waits longer than this (s).
THREAD_JOIN_TIMEOUT_S = 5.0
#: Serve loops wake at least this often (ms) to notice a stop request.
POLL_INTERVAL_MS = 200
#: Malformed-input log lines per peer kind and minute (counters keep the exact numbers).
LOG_RATE_PER_MINUTE = 10

# --- reliable tasks -------------------------------------------------------------------------
#: Tasks a worker holds per producer (its credit): enough to stay busy between result batches,
#: few enough that a worker that dies strands little work.
TASK_PREFETCH = 64
#: Largest credit a worker may grant, and most tasks or results in one message (bounded tables).
MAX_TASK_CREDIT = 65535
#: A worker busy on one task for longer than this (s) is presumed hung: its tasks go elsewhere.
TASK_DEADLINE_S = 60.0
#: Deliveries per task before it is dead-lettered: a poison task gets a few tries, not forever.
TASK_MAX_ATTEMPTS = 5
#: The first retry after a handler error waits this long (s); each later one twice as long.
TASK_BACKOFF_S = 0.1
#: ...but never longer than this (s), so a retried task still runs while anyone waits for it.
TASK_BACKOFF_MAX_S = 30.0
#: Workers batch the results of fast handlers for at most this long (s): fewer messages.
TASK_RESULT_FLUSH_S = 0.01
#: Unsettled tasks per producer before submit() waits: bounded memory under overload.
TASK_QUEUE_LIMIT = 100_000
#: The dispatcher checks deadlines and retry timers at least this often (ms).
TASK_TICK_MS = 50
#: Completions reach the journal at least this often (s); new tasks are committed before sending.
JOURNAL_COMMIT_S = 0.05
#: Longest task id and idempotency key (characters): ids are keys, not payload.
MAX_TASK_ID = 128
MAX_TASK_KEY = 256

# --- metrics --------------------------------------------------------------------------------
#: Histogram bounds (s) of request and handler durations: a loopback round trip is ~0.1 ms,
#: a slow handler seconds; 17 buckets keep a scrape small.
METRICS_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: A metrics client that stalls mid-request is dropped after this (s): the server answers one
#: scrape at a time, and close() waits for the one under way.
METRICS_REQUEST_TIMEOUT_S = 5.0
