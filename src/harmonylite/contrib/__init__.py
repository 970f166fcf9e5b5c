"""Integrations with application frameworks; each module imports its framework only when used."""
