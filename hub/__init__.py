"""Tether hub: the control plane that agents dial out to."""

__version__ = "0.1.0"
