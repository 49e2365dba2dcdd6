"""Serving layer: scheduler, worker processes and the typed messages between them (no HTTP here)."""
