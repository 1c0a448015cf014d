"""Periodic maintenance jobs (each idempotent: two beats at once are harmless)."""
