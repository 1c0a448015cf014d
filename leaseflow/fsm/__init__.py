"""The pure finite-state-machine core: definitions, outcomes, validation, policies."""
