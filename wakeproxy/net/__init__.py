"""Bytes on the wire: the forwarding Protocols, held connections and their paced
release, connects, readiness probes."""
