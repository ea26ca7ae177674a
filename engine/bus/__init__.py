"""The relay from the SQL log to NATS JetStream."""
