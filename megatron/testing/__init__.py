"""Helpers shared by the test suite (multi-process launch on gloo, tiny configs)."""
