"""Coverage-guided fuzzing of every entry point that takes bytes from outside (``python3 -m fuzz``).

Layout: :mod:`fuzz.oracle` (what counts as a crash), :mod:`fuzz.world` (the stateful parts, built once
per process: a temporary PKI, EDHOC handshake states, established sessions and endpoints),
:mod:`fuzz.targets` (one harness per entry point), :mod:`fuzz.worker` (one target under atheris, in
its own process), :mod:`fuzz.run` (the command line), :mod:`fuzz.seeds` (writes ``fuzz/corpus/``) and
:mod:`fuzz.mutate` (a plain mutator for runs without atheris). See docs/fuzzing.md.
"""
