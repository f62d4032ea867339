"""Shared fixtures for the scanner simulator tests (none beyond the suite's own yet)."""
