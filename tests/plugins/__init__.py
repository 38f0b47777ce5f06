"""Pytest plugins (registered in tests/conftest.py): the fixtures every test module can ask
for by name, without importing them."""
