"""Programs that live on the bus and talk to cairn over NATS and HTTP."""
