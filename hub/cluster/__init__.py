"""Cluster mode: several hubs on one Redis, one fleet (docs/cluster.md).

Each module owns one mechanism: ``link`` the connection to Redis and its health, ``leases``
the hubs' leases and the one leader, ``ownership`` which hub holds which agent, ``inbox``
the durable streams between hubs, ``events`` the event fan-out, ``mirror`` the fleet as
every hub sees it, ``ledger`` the ledger's leader and its followers, ``runtime`` the wiring.
Nothing here is imported by the single hub.
"""
