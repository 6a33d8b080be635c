"""pytest-benchmark suite over the same cases as ``ptkernels bench`` (not collected by plain ``pytest``,
whose testpaths is tests/). See benchmarks/README.md."""
