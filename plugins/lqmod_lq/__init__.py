"""Placeholder: being written (see issues 5 and 6)."""
