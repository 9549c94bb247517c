"""Integrations with application frameworks (each imports its framework lazily)."""
