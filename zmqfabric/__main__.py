"""``python -m zmqfabric``: the command line (same as the ``zmqfabric`` script)."""

from .cli import main

main()
