"""core/buckets.py: token buckets per address (pure)."""

from zmqfabric.core.buckets import AddressBuckets


def test_a_burst_then_the_rate_and_loopback_gets_its_factor() -> None:
    buckets = AddressBuckets(burst=2, rate_per_s=1.0, local_factor=4, capacity=8)
    for _ in range(2):
        assert buckets.has("10.0.0.1", 0.0)
        buckets.take("10.0.0.1", 0.0)
    assert not buckets.has("10.0.0.1", 0.0)
    assert not buckets.has("10.0.0.1", 0.5) and buckets.has("10.0.0.1", 1.0)
    assert buckets.tokens("127.0.0.1", 0.0) == 8.0  # burst x factor
    assert buckets.tokens("10.0.0.1", 100.0) == 2.0  # never above the burst


def test_only_capacity_addresses_are_remembered() -> None:
    buckets = AddressBuckets(burst=1, rate_per_s=0.0, local_factor=1, capacity=2)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        buckets.take(address, 0.0)
    assert buckets.has("10.0.0.1", 0.0)  # forgotten: a full bucket again
    assert not buckets.has("10.0.0.3", 0.0)


def test_a_token_given_back_is_spent_again_but_never_above_the_burst() -> None:
    buckets = AddressBuckets(burst=2, rate_per_s=0.0, local_factor=1, capacity=8)
    for _ in range(10):  # ten calls that each turned out harmless: never throttled
        assert buckets.has("10.0.0.1", 0.0)
        buckets.take("10.0.0.1", 0.0)
        buckets.give("10.0.0.1", 0.0)
    buckets.give("10.0.0.1", 0.0)
    assert buckets.tokens("10.0.0.1", 0.0) == 2.0
    buckets.give("10.0.0.9", 0.0)  # never taken: nothing to give back
    assert buckets.tokens("10.0.0.9", 0.0) == 2.0
