"""The hub's core: settings, errors, storage ports and their backends, the outbox worker.

Nothing here imports a web framework, protocol library or engine client except the backend
modules that wrap them (checked by import-linter).
"""
