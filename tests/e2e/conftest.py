"""End-to-end fixtures (see pacs_fixtures.py, which tests/viewer shares)."""

from pacs_fixtures import E2E_SETTINGS, e2e_node, orthanc  # noqa: F401
