"""Simulated scanners: synthetic studies with realistic headers and fake PHI, sent by
C-STORE, for tests and the demo."""
