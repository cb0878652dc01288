"""Workflows run in a child process that serves peftkit as `peft` (see tests/test_integrations.py)."""
