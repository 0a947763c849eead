"""The wire contract shared by the hub, the agent, the CLI and the console.

``messages`` defines every message, ``codec`` is the strict JSON both sides speak,
``constants`` names paths, subprotocols and close codes, and ``connection`` is the lean
WebSocket layer all three programs run on. Nothing here imports the hub's server code.
"""
