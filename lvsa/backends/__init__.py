"""Backends shipped inside the core distribution (only the reference)."""
