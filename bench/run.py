"""One command for every benchmark: ``python3 -m bench`` (or ``python3 -m bench.run``).

Prints the machine description and every part's markdown tables, in one run, so that the
comparisons (sealed vs plaintext, EDHOC vs TLS 1.3, our record vs raw AEADs) share the same
conditions. ``--quick`` runs each part with tiny parameters (what tests/test_bench_smoke.py does);
``--only`` picks parts. Paste the output into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import bench_media, bench_method3, broker, handshake, ingest, memory, records, shared_state, workers
from bench.stats import machine

PARTS = ("handshake", "method3", "records", "memory", "broker", "media", "state", "ingest", "workers")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run the sealmq benchmarks and print markdown")
    ap.add_argument("--quick", action="store_true", help="tiny parameters: checks that everything runs")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    ap.add_argument("--handshake-runs", type=int, default=200)
    ap.add_argument("--messages", type=int, help="messages per broker throughput run")
    ap.add_argument("--devices", type=int, help="simulated devices for the handshake storm")
    ap.add_argument("--broker-repeats", type=int,
                    help="throughput rounds per broker (default 11); runs of each storm (default 5) "
                         "and worker case (default 3)")
    ap.add_argument("--sessions", type=int, help="established sessions for the memory part (default 10,000)")
    ap.add_argument("--worker-messages", type=int, help="telemetry readings per device, workers part (default 1,500)")
    args = ap.parse_args(argv)
    parts = args.only or list(PARTS)
    started = time.monotonic()
    print("## Machine\n")
    print(machine())
    print()
    if "handshake" in parts:
        runs, warmup = (5, 1) if args.quick else (args.handshake_runs, 5)
        print(handshake.run(runs, warmup))
        sys.stdout.flush()
    if "method3" in parts:
        print(bench_method3.run(20 if args.quick else 300))
        sys.stdout.flush()
    if "records" in parts:
        print(records.run(quick=args.quick))
        sys.stdout.flush()
    if "memory" in parts:
        print(memory.run(quick=args.quick, sessions=args.sessions))
        sys.stdout.flush()
    if "broker" in parts:
        print(broker.run(quick=args.quick, messages=args.messages, devices=args.devices,
                         repeats=args.broker_repeats))
        sys.stdout.flush()
    if "media" in parts:
        print(bench_media.run(quick=args.quick))
        sys.stdout.flush()
    if "state" in parts:
        print(shared_state.run(quick=args.quick))
        sys.stdout.flush()
    if "ingest" in parts:
        print(ingest.run(quick=args.quick))
        sys.stdout.flush()
    if "workers" in parts:
        print(workers.run(quick=args.quick, messages=args.worker_messages, repeats=args.broker_repeats))
    print(f"_total benchmark time: {time.monotonic() - started:.0f} s_")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
