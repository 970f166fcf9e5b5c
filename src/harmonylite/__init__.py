"""harmonylite: leaderless SQLite replication over NATS JetStream, with verified snapshots."""

__version__ = "0.1.0"
