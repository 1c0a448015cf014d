"""The store contract: one suite that every RunStore passes."""
