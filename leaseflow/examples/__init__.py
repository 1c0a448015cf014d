"""Example workflows, readable code to copy (``leaseflow demo`` runs the agent one)."""
