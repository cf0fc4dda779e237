"""SWIM's timers (:mod:`.swim`): the configured ones (:class:`Timing`), how long answers take
(:class:`RoundTrip`) and how long a suspect has to refute (:func:`suspicion_timeout`).

Pure: no IO, threads or clock. Not thread-safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import constants as C
from ..errors import LocalProtocolError

__all__ = ["RoundTrip", "Timing", "suspicion_timeout"]


@dataclass(frozen=True, slots=True)
class Timing:
    """The liveness timers of a node (``NodeConfig.liveness``); defaults in constants."""

    probe_interval_s: float = C.PROBE_INTERVAL_S
    probe_timeout_s: float = C.PROBE_TIMEOUT_S
    indirect_probes: int = C.INDIRECT_PROBES
    suspicion_s: float = C.SUSPICION_S
    suspicion_max_factor: float = C.SUSPICION_MAX_FACTOR
    confirmations: int = C.SUSPICION_CONFIRMATIONS
    gossip_interval_s: float = C.GOSSIP_INTERVAL_S
    gossip_batch_s: float = C.GOSSIP_BATCH_S
    retransmit_mult: int = C.RETRANSMIT_MULT
    former_keep_s: float = C.FORMER_KEEP_S
    former_probe_s: float = C.FORMER_PROBE_S
    requery_s: float = C.REQUERY_S
    sync_s: float = C.SYNC_S

    def __post_init__(self) -> None:
        times = (self.probe_interval_s, self.probe_timeout_s, self.suspicion_s,
                 self.gossip_interval_s, self.gossip_batch_s, self.former_keep_s,
                 self.former_probe_s, self.requery_s, self.sync_s)
        if min(times) <= 0 or self.probe_timeout_s * 3 > self.probe_interval_s:
            raise LocalProtocolError("liveness timers must be > 0, probe_timeout_s <= interval/3")
        if self.suspicion_max_factor < 1 or min(self.indirect_probes, self.confirmations,
                                                self.retransmit_mult) < 0:
            raise LocalProtocolError("suspicion_max_factor must be >= 1, counts >= 0")


class RoundTrip:
    """How long answers take, as TCP estimates it (Jacobson/Karels: smoothed time and mean
    deviation), and the timeout that follows: on a loaded host answers slow down, and so do our
    verdicts, instead of turning slowness into deaths."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def timeout(self, floor: float, ceiling: float, initial: float) -> float:
        """srtt + 4 * rttvar, within [floor, ceiling]; ``initial`` before any answer came (as
        TCP starts at 1 s: a node that just started knows nothing of its peers' load)."""
        if self.srtt is None:
            return initial
        return min(ceiling, max(floor, self.srtt + 4 * self.rttvar))


def suspicion_timeout(timing: Timing, n: int, floor: float, confirmations: int) -> float:
    """How long (s) a suspect has to refute in a fabric of ``n`` nodes, with ``confirmations``
    independent confirmations of the suspicion (Lifeguard: from max down to min as they come
    in). Min scales with log10(n) and is at least ``floor``; max is ``suspicion_max_factor``
    times min."""
    low = max(timing.suspicion_s * max(1.0, math.log10(n)), floor)
    high = low * timing.suspicion_max_factor
    expected = min(timing.confirmations, max(0, n - 2))
    if expected < 1:
        return low
    frac = math.log(confirmations + 1) / math.log(expected + 1)
    return max(low, high - frac * (high - low))
