"""The ``edgeota-agent`` CLI (placeholder)."""
