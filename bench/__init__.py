"""sealmq benchmarks: handshake CPU and bytes, record seal/open cost, end-to-end broker throughput.

Run everything with ``python3 -m bench`` (``--quick`` for a smoke-sized run); each part also runs
alone (``python3 -m bench.handshake``, ``bench.records``, ``bench.broker``). Results are printed
as markdown tables; ``docs/benchmarks.md`` holds a recorded run and its interpretation.
"""
