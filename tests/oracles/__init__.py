"""Test oracles: slow, obvious implementations the shipped code is checked against.

They live beside the tests, not in the package, so nothing a user installs carries them.
The benchmarks that use them put ``tests/`` on ``sys.path`` first.
"""
