"""The benchmarks are not tests: they run only when asked for (``nox -s bench``)."""
