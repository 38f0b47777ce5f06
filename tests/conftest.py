"""The test suite's plugins: their fixtures reach every test module by name, unimported.

Helpers (paths, the service harness, trip scenarios) are plain modules in `tests/support/`;
a test module imports those, never another test module (`tests/test_suite_layout.py`).
"""

pytest_plugins = [
    "tests.plugins.data",
    "tests.plugins.databases",
    "tests.plugins.s3",
]
