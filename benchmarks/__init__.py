"""ptkernels' benchmarks (outside the package): ``e2e`` (PEFT vs ptkernels.patch, end to end), ``ops``
(registry, peers, runner, verifier, report), ``timing`` and ``env``. ``ptkernels bench`` and
``ptkernels verify`` are thin entry points into these; see benchmarks/README.md."""
