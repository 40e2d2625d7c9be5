"""The shipped policy files, importable as package data (guardrail.policies)."""
