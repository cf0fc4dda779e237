"""Forwarding devices (queue, forwarder, streamer): nodes that relay one pattern at C speed.

Installed as ``zmqfabric.devices``.
"""
