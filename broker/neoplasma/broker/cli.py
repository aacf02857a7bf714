"""`neoplasma broker`: its options are BrokerConfig's settings."""

from __future__ import annotations

from neoplasma.broker.server import BrokerService
from neoplasma.broker.settings import BrokerConfig
from neoplasma.core.commands import Commands, add_server


def add_commands(commands: Commands) -> None:
    add_server(commands, "broker", "run a broker (publish + relay to proxies)", BrokerConfig, BrokerService)
