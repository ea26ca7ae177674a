"""Programs that live on the bus and talk to cairn over NATS and HTTP."""

from typing import Final

# The NATS server the consumers use when neither an option, CAIRN_NATS_URL
# nor a configuration file names one: the default port on loopback.
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
