"""From mDNS hints to a live directory of peers: zeroconf advertise/browse (mdns), the directory,
name claims and introductions (membership), and peer liveness."""
