"""Helpers shared by the test modules (import them as tests.helpers.<module>)."""
