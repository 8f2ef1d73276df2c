"""Deprecated package name: the harness is :mod:`nbbn.bench`. Kept for one release so that
``python -m nbbn.harness.targets|fusion|readme`` keep working (they print where they went)."""
