"""Every default of the fabric in one place, each with the reason for its value.

Tests and embedders may pass other values through :class:`zmqfabric.config.NodeConfig`;
nothing reads these names at call time except as defaults.
"""

from __future__ import annotations

# --- wire -----------------------------------------------------------------------------------
#: Protocol version carried in every header; a peer speaking another version is refused.
PROTOCOL_VERSION = 2
#: Largest message an endpoint accepts, all frames together (NATS's max_payload default): a peer
#: that sends a bigger frame is disconnected before it is read (ZeroMQ's MAXMSGSIZE, per frame),
#: and a message whose frames add up to more is dropped while it is read. Raise it per node
#: (NodeConfig.max_message_size) or per endpoint for large raw bodies.
MAX_MESSAGE_SIZE = 1024 * 1024
#: What a message may carry beyond its body: routing ids, header (<= 4 KiB), topic (<= 1 KiB).
#: The limit a socket enforces is MAX_MESSAGE_SIZE plus this, so a body of exactly the maximum
#: size still goes through.
MESSAGE_ENVELOPE = 64 * 1024
#: Bodies up to this size decode without an expansion check: even the worst one (nested empty
#: containers, ~90 bytes of Python objects per byte) stays under 1.5 MiB and a millisecond.
DECODE_CHECK_SIZE = 16 * 1024
#: A larger body may cost at most this many times its size in Python objects, plus the allowance
#: below; ordinary data (strings, numbers, records) costs 1-22 times, crafted data up to 90.
DECODE_EXPANSION = 24
DECODE_ALLOWANCE = 64 * 1024
#: Frames a control message, an XPUB's upstream (subscriptions) or a probe reply may have: small
#: by design, so a peer cannot park big frames there.
MAX_CONTROL_MESSAGE = 64 * 1024
#: Largest subscription frame an XPUB accepts: 1 byte, a topic prefix (MAX_TOPIC_SIZE) and slack.
MAX_SUBSCRIPTION_SIZE = 1 + 1024 + 64
#: Bytes one connection may send upstream of an XPUB (subscriptions, handshake): libzmq keeps
#: ~48 bytes per subscription byte, so this bounds one peer to ~12 MiB; a forwarder relaying
#: thousands of subscribers' topic prefixes fits. Plus heartbeats, an allowance per second.
MAX_UPSTREAM_BYTES = 256 * 1024
UPSTREAM_ALLOWANCE_PER_S = 256
#: How often (ms) the upstream byte counts are read: every UPSTREAM_CHECK_MS while subscribers
#: are connected, every UPSTREAM_CHECK_FAST_MS while one of them is sending a lot.
UPSTREAM_CHECK_MS = 500
UPSTREAM_CHECK_FAST_MS = 10
#: Subscription messages an XPUB's inbound pipe holds per connection (see patterns.base.Bound).
UPSTREAM_HWM = 64
#: A peer address cut for flooding has its new connections cut at once this long (s).
UPSTREAM_PENALTY_S = 10.0
#: Headers are small by design; a bigger one is hostile or a bug.
MAX_HEADER_SIZE = 4096
#: Topics are prefixes for ZeroMQ's filter, not payload.
MAX_TOPIC_SIZE = 1024
#: Bodies at least this long that are bytes go out as a raw frame without a copy.
ZERO_COPY_THRESHOLD = 64 * 1024
#: Messages one batch frame carries at most (send_many): past a few hundred, a bigger batch
#: gains nothing per message (measured: 1.4 M/s at 16, 2.1 M/s at 256 small messages) and a
#: receiver holds the rest of a batch while its caller handles one.
MAX_BATCH = 256

# --- sockets --------------------------------------------------------------------------------
#: Closing never blocks longer than this (ms) waiting for unsent messages.
LINGER_MS = 500
#: Queue depth per peer before PUB drops / PUSH blocks: bounded memory, generous for bursts.
HWM = 10_000
#: ZeroMQ heartbeat: a silent TCP peer is dropped after TIMEOUT even without a FIN.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1_500
HEARTBEAT_TTL_MS = 3_000
#: The control endpoint pings its clients this seldom (ms; timeout three times it). Liveness
#: keeps PROBE_SPREAD connections to each node's control endpoint, and at HEARTBEAT_IVL_MS their
#: pings cost about 0.08 % of a core per node, a third of its idle cost; probes are the
#: heartbeats there, and these pings only clear connections from hosts that vanished.
CONTROL_HEARTBEAT_IVL_MS = 10_000
#: The control thread serves up to this many queued messages per poll (a death storm queues
#: gossip faster than a loaded host serves it: a poll per message costs it more); bounded, so
#: that it looks at its inbox (a stop) between batches.
CONTROL_BATCH = 64
#: Reconnect quickly on loopback/LAN; back off to 2 s for peers that stay away.
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 2_000

# --- discovery ------------------------------------------------------------------------------
#: DNS-SD service type that every node registers.
SERVICE_TYPE = "_zmqfabric._tcp.local."
#: The fabric a node joins unless told otherwise; nodes of other fabrics are invisible to it.
DEFAULT_FABRIC = "default"
#: Record TTL (s): liveness comes from SWIM, not from records expiring. Browsers refresh a record
#: at 75 % of its TTL and every node hears every refresh, so a short TTL costs O(N) packets per
#: node (15 s: about 2 N / 11 per second). 75 min is the DNS-SD default (RFC 6762, section 10).
RECORD_TTL_S = 4500
#: Registering our record is local work in zeroconf's loop: past this (s) the host is very busy
#: (a warning), and past REGISTER_TIMEOUT_MAX_S the node gives up (FabricTimeoutError).
REGISTER_TIMEOUT_S = 5.0
REGISTER_TIMEOUT_MAX_S = 60.0
#: A node announces its record this many times when it registers or updates it, this far apart
#: (s): RFC 6762 8.3 asks for at least two; python-zeroconf sends three. Every node of a host
#: parses every copy, so each one more costs every node there a packet per join.
ANNOUNCEMENTS = 2
ANNOUNCE_INTERVAL_S = 0.225
#: After advertising, a node listens this long (s) for another live node of its name. Peers
#: introduce themselves over ZeroMQ within milliseconds; mDNS answers take 20-120 ms.
CONFLICT_WINDOW_S = 0.2
#: With on_conflict="suffix", names tried after the first: name-2 ... name-(1+this).
MAX_NAME_SUFFIX = 8
#: How long a browser waits for a peer's full record (SRV/TXT/A) after seeing its name.
RESOLVE_TIMEOUT_S = 1.0
#: Records asked for at once (their SRV/TXT/A were not cached): bare names from the network are
#: cheap to send, so only this many are chased; more are counted as unresolved and dropped.
MAX_RESOLVING = 64
#: A starting node's legacy unicast query (discovery/quickquery.py) takes answers this long (s):
#: responders answer it at once, so this only has to outlast a slow or loaded host.
QUICK_QUERY_WINDOW_S = 2.0
#: A node that advertises sends its one mDNS query this long (s, times 1 to 2 at random) after it
#: starts browsing: by then the nodes that heard its announcement have called it (PROTOCOL.md
#: 6.2) and are listed as known answers, so only nodes that did not call answer (a program that
#: does not verify newcomers, a lost announcement). A querying browser instead cost every node on
#: a host O(N) answers per join (discovery/watch.py).
JOIN_QUERY_DELAY_S = 1.0
#: ...and not before its verifier has settled: no new hint (a caller) for JOIN_QUERY_QUIET_S,
#: and none waiting for its first call or in it (looked at every JOIN_QUERY_RECHECK_S); at most
#: JOIN_QUERY_MAX_WAIT_S after it starts browsing. Nodes whose calls it is still checking are
#: listed as known answers too. At 150 nodes on one host the query went out at 1-2 s while
#: callers were still coming and being checked: 46 nodes answered it, and every node of the host
#: decoded each answer (O(N) packets per join, O(N^2) work).
JOIN_QUERY_QUIET_S = 1.0
JOIN_QUERY_RECHECK_S = 0.5
JOIN_QUERY_MAX_WAIT_S = 20.0
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

# --- liveness (SWIM: see zmqfabric/core/swim.py) ---------------------------------------------
#: Each node probes one member per period: a node's probing costs the same at 10 nodes or 1000.
#: A killed node is noticed sooner: its probers' connections to it drop at once.
PROBE_INTERVAL_S = 1.0
#: A node takes turns probing the next PROBE_SPREAD members on a ring of node ids, over
#: connections it keeps: each member has that many probers, a node that many probe connections.
PROBE_SPREAD = 3
#: A direct probe unanswered this long (s) is retried through INDIRECT_PROBES other members, who
#: get twice as long; a member silent for the three is suspect. A loopback or LAN round trip
#: takes under a millisecond; this leaves room for a busy peer.
PROBE_TIMEOUT_S = 0.2
#: ...unless answers take longer: the timeout follows the answer times seen (srtt + 4 rttvar, as
#: TCP's), up to this (s). A suspect always gets SUSPICION_RTO_MULT such timeouts to refute.
PROBE_TIMEOUT_MAX_S = 5.0
#: ...and starts at this (s), before any answer was timed (TCP's initial RTO is 1 s).
PROBE_TIMEOUT_INITIAL_S = 1.0
#: A suspect's least time to refute, in answer timeouts: the accusation reaches it and its
#: refutation comes back within one each, with room for a slow period. (A live process that is
#: only slow is told apart by its port: SLOW_PEER_S.) A pulled cable is seen within about a
#: period, three timeouts to suspect, and this.
SUSPICION_RTO_MULT = 3
#: An answer that comes after its timeout still counts (and is timed) this long (s).
LATE_ANSWER_S = 10.0
#: A member that misses a probe, or whose kept connection drops, has its control port checked
#: (a TCP connect): "refused" from its host means the process is gone, dead at once. A live host
#: answers within a round trip; a silent one gets this long (s).
PORT_CHECK_S = 0.2
#: Members asked to probe a silent member for us: a broken path between two nodes alone does
#: not make one suspect the other (SWIM's indirect probes; memberlist uses 3).
INDIRECT_PROBES = 3
#: A suspect has at least this long (s) times log10(fabric size) to refute before it is dead:
#: 0.5 s up to 10 nodes, 1.2 s at 300. Gossip reaches every node in O(log N) periods.
SUSPICION_S = 0.5
#: A suspicion nobody confirms waits this many times longer (Lifeguard: independent
#: confirmations shorten it to the minimum).
SUSPICION_MAX_FACTOR = 3.0
#: A suspect whose host still accepts connections at its control port is a live process, only
#: slow (a host so loaded that it answers nothing for seconds, as when hundreds of nodes start
#: on two cores): it gets this long (s). One that accepts but answers nothing for longer is hung.
SLOW_PEER_S = 30.0
#: Independent confirmations that bring a suspicion down to its minimum time.
SUSPICION_CONFIRMATIONS = 2
#: While there is news, a node also pushes it to its PROBE_SPREAD ring successors, besides
#: piggybacking it on probes and answers: suspicions and refutations at most this often (s), so
#: that a suspect hears it in time to refute, and the refutation outruns the suspicion...
GOSSIP_INTERVAL_S = 0.1
#: ...and other news (deaths, leaves, joins) at most this often (s). Above GOSSIP_INTERVAL_S a
#: death storm goes in fewer, fuller pushes, which is what a crowded host needs (250 nodes on 2
#: cores, 30 SIGKILLed after a fast start, one run each: at 0.3 s 0.81 ms a death per survivor
#: and all dropped within 2.55 s, against 0.98 ms and 2.88 s), but 2 of the 4 runs at 250 nodes
#: with some news paced did not reach all-see-all in 20 minutes, against 2 of 2 without; until
#: that is understood it stays off (NodeConfig.liveness.gossip_batch_s sets it).
GOSSIP_BATCH_S = 0.1
#: Each update goes out in RETRANSMIT_MULT * ceil(log10(N + 1)) messages (or rounds) from every
#: node that knows it (memberlist: 4, over UDP; ours travel over TCP).
RETRANSMIT_MULT = 3
#: Updates carried by one probe or answer; by one gossip message.
MAX_PIGGYBACK = 8
MAX_GOSSIP = 32
#: Accusations (suspect, dead, left) remembered as taken, one per node id, so that the copies
#: of one that keep arriving are skipped undecoded (bounded: a peer can make us hold them).
MAX_TAKEN = 4096
#: Updates waiting to be sent, and former members kept (bounded: a peer can make us hold them).
MAX_BROADCASTS = 1024
MAX_FORMERS = 1024
#: A member found dead is a *former* this long (s) and is probed now and then, so a partition of
#: up to this length heals as soon as the link is back (memberlist/Serf keep trying for 24 h).
FORMER_KEEP_S = 3600.0
#: Each node probes a random former this often (s), with probability FORMER_PROBERS / N: about
#: that many probes per period reach the formers whatever the fabric's size.
FORMER_PROBE_S = 0.5
FORMER_PROBERS = 3
#: Beyond FORMER_KEEP_S, mDNS finds a node again: about REQUERY_SENDERS nodes of the fabric send
#: a PTR query every REQUERY_S (s), which every node missing from its known answers answers.
REQUERY_S = 30.0
REQUERY_SENDERS = 2
#: Anti-entropy: each node swaps its member list with one random member this often (s), so
#: that gossip a node missed (a join, a death) reaches it anyway (memberlist: push-pull, 30 s).
SYNC_S = 30.0
#: A node's first swap comes this long (s, plus up to as much again at random) after it starts,
#: and again as often until it had a member to swap with: a node that joined in a start rush
#: learns every member whose discovery it missed in seconds, not in SYNC_S.
SYNC_FIRST_S = 2.0
#: Most members listed in one anti-entropy message (bounded: a peer can make us hold them).
MAX_SYNC = 1024
#: Outgoing probe connections open at once; an idle one closes after PROBE_IDLE_S (s).
MAX_PROBE_SOCKETS = 16
PROBE_IDLE_S = 1.0
#: Port checks (at most MAX_PROBE_SOCKETS under way) that may wait for a socket: a death storm
#: asks for many at once.
MAX_QUEUED_CHECKS = 256
#: Unknown nodes being verified at once (a hint is checked by probing the node itself), and how
#: long (s) a node that did not answer is not tried again on another hint.
MAX_VERIFYING = 64
HINT_RETRY_S = 2.0
#: Calls in all to a node heard of in gossip that does not answer (a node busy starting; a host
#: under load): each waits longer, the pauses doubling from HINT_RETRY_S (about 30 s in all).
#: With one call, a node falsely buried under load waited for anti-entropy (SYNC_S) or mDNS at
#: nodes that missed the gossip of its return: 80 s seen at 225 nodes on one host.
ADMISSION_ATTEMPTS = 5
#: A node leaving tells this many members (the mDNS goodbye tells the subnet at once).
LEAVE_FANOUT = 3
#: Lifeguard's local health: a node that wakes up late or has to refute waits up to
#: (1 + HEALTH_MAX) times longer for answers, instead of declaring others dead.
HEALTH_MAX = 8
#: An unreachable peer is declared dead within about this long (s) in a small fabric: a probe
#: period, the indirect probes and the longest suspicion.
LIVENESS_CONNECT_TIMEOUT_S = 3.0
#: The housekeeping thread sleeps at most this long (ms) between timer checks.
LIVENESS_TICK_MS = 1000

# --- verification: mDNS, hellos and introductions are hints; the peer itself is the truth ---
#: A hint is verified by one control call to its advertiser; a real node answers in ms.
VERIFY_TIMEOUT_S = 1.0
#: Verifications in flight at once (each a short-lived socket and one TCP connection).
MAX_PENDING_VERIFICATIONS = 32
#: Hints waiting for a verification slot or a token; the oldest are dropped (counted) beyond.
MAX_QUEUED_HINTS = 256
#: Per advertised address: a burst of this many verifications, then VERIFY_RATE_PER_S; a call
#: that the node it names answers gives its token back (a host may run hundreds of nodes, all at
#: one address: only calls that fail, to ports where nothing or someone else answers, count).
VERIFY_BURST = 32
VERIFY_RATE_PER_S = 16.0
#: ...four times that for loopback addresses: every node of a host shares one, and a probe there
#: cannot reach another host.
VERIFY_LOCAL_FACTOR = 4
#: A verified or refused hint is not checked again for this long (s), and at most this many
#: outcomes are remembered.
VERIFY_CACHE_S = 30.0
MAX_VERIFY_CACHE = 4096
#: Addresses whose parse (and scope check) is remembered, least recently used first out:
#: records name few distinct addresses (a host's nodes share one), and a flood of distinct ones
#: only evicts.
ADDRESS_CACHE = 1024
#: A newcomer of an unsecured fabric that answered our call carrying ``me`` calls us back within
#: moments to verify us (PROTOCOL.md 6.2), which proves it took our record: it is greeted only if
#: that call has not come after this long (s; at most LIVENESS_TICK_MS later), so a program that
#: ignores ``me`` still hears of us. At most MAX_PENDING_GREETS wait (more are greeted at once).
GREET_WAIT_S = 2.0
MAX_PENDING_GREETS = 1024
#: ...but a hint whose node did not answer (busy, starting, a lost packet) is checked again after
#: this long (s), and when heard again after this long once refused.
VERIFY_RETRY_S = 2.0
#: Calls made for one hint whose node does not answer before it is refused.
VERIFY_ATTEMPTS = 2
#: ...but a node that completed the handshake and then did not answer is there and busy (a start
#: rush: dozens of nodes starting on one host answer late): it is called up to this many times,
#: each call waiting VERIFY_TIMEOUT_S longer (at most VERIFY_TIMEOUT_MAX_S), the pause between
#: calls doubling from VERIFY_RETRY_S (at most VERIFY_RETRY_MAX_S): about a minute in all.
VERIFY_BUSY_ATTEMPTS = 6
VERIFY_TIMEOUT_MAX_S = 4.0
VERIFY_RETRY_MAX_S = 16.0
#: The verifier thread sleeps until its next deadline (a call's end, a retry, a token for a
#: queued hint), but at least this long (ms): a deadline is acted on up to this late.
VERIFY_TICK_MS = 50
#: Most nodes a directory holds (and so peers watched and connected); lowered at start to fit the
#: process's file descriptors (FDS_PER_PEER each, FD_RESERVE kept for everything else).
MAX_PEERS = 1024
FDS_PER_PEER = 8
FD_RESERVE = 256
#: Introduced control URLs (``peers`` messages) greeted: each URL once per VERIFY_CACHE_S, at most
#: this many distinct ports per host, INTRODUCE_BURST at once then INTRODUCE_RATE_PER_S.
MAX_INTRODUCED_PER_HOST = 4
INTRODUCE_BURST = 16
INTRODUCE_RATE_PER_S = 4.0

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
#: An asyncio node runs a wait that only a thread can do (the task registry's) in slices this
#: long (s): a cancelled wait leaves its thread behind for at most one slice.
AIO_THREAD_WAIT_S = 0.25
#: Serve loops wake at least this often (ms) to notice a stop request.
POLL_INTERVAL_MS = 200
#: Malformed-input log lines per peer kind and minute (counters keep the exact numbers).
LOG_RATE_PER_MINUTE = 10

# --- handlers -------------------------------------------------------------------------------
#: Most handler slots of one endpoint (``concurrency=``): each is a thread (or a coroutine); more
#: is a configuration error, and CPU-bound handlers scale with processes (`run --replicas`).
MAX_CONCURRENCY = 1024
#: run() looks for hung handler slots this often (s); a slot is hung after the endpoint's limit
#: (a service: the request timeout, its callers have given up; tasks: TaskConfig.deadline_s).
SLOT_WATCH_S = 1.0

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
#: The dispatcher's nap (ms): tasks submitted within this long of others that are unsettled are
#: taken by the batch after it, not with a wake-up and a round each (durable ones come a commit
#: apart: a round per task halved the rate a submitting thread got, and sent ~5 per message).
#: Such a task waits at most this long more to be sent, and results at most this long to be read.
TASK_NAP_MS = 1
#: Completions reach the journal at least this often (s); new tasks are committed before sending.
JOURNAL_COMMIT_S = 0.05
#: The journal file is compacted (its live records copied to a new file) once it is at least
#: this big (bytes) and at most a quarter live: each rewrite copies at most a third of what was
#: appended since the last, and a small file is not rewritten for a few settled tasks.
JOURNAL_COMPACT_MIN_BYTES = 4 << 20
#: Longest task id and idempotency key (characters): ids are keys, not payload.
MAX_TASK_ID = 128
MAX_TASK_KEY = 256
#: A second submit with an idempotency key returns the first task's handle while that task is
#: unsettled and for this long (s) after it settled: longer than a client's retry storm.
TASK_DEDUPE_WINDOW_S = 300.0
#: Most settled keys remembered (each keeps its handle and result): bounded memory under a
#: stream of keyed tasks; the oldest are forgotten first, even within the window.
TASK_DEDUPE_MAX_KEYS = 200_000
#: Encoded size a task adds to a task message besides its payload and key: array and string
#: headers, the id (at most 128 characters) and the attempt. Used to refuse what no worker takes.
TASK_FRAME_OVERHEAD = 160

# --- metrics --------------------------------------------------------------------------------
#: Histogram bounds (s) of request and handler durations: a loopback round trip is ~0.1 ms,
#: a slow handler seconds; 17 buckets keep a scrape small.
METRICS_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: A metrics client that stalls mid-request is dropped after this (s): the server answers one
#: scrape at a time, and close() waits for the one under way.
METRICS_REQUEST_TIMEOUT_S = 5.0
