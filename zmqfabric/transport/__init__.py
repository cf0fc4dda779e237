"""Everything below the patterns that calls ZeroMQ: sockets and their options, frames, the
owner-thread inbox. Knows nothing of nodes."""
