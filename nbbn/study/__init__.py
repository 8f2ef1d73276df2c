"""Deprecated package name: the accuracy study is :mod:`nbbn.accuracy`. Kept for one release so
that ``python -m nbbn.study.distributed`` keeps working (it prints where it went)."""
