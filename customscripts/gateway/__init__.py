"""Data Access Gateway: scoped execution tokens, read API, rate limits, and the client the supervisor uses."""
