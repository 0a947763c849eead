"""Tether agent: dials out to the hub, registers, heartbeats and runs the commands it declared."""

__version__ = "0.1.0"
