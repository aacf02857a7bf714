"""`neoplasma ingest-redis`: its options are IngestConfig's settings."""

from __future__ import annotations

from neoplasma.core.commands import Commands, add_server
from neoplasma.ingest.reader import IngestService
from neoplasma.ingest.settings import IngestConfig


def add_commands(commands: Commands) -> None:
    add_server(commands, "ingest-redis", "read plasma's Redis Pub/Sub channels into the brokers", IngestConfig,
               IngestService)
