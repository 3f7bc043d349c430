"""Helpers the test suites share: waiting, ports, databases, models and data."""
