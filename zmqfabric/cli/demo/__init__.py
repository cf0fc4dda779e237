"""``zmqfabric demo``: a fabric of real processes on this host (run: the parent; roles: the
children)."""
