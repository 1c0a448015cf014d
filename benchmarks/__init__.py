"""leaseflow benchmarks (not tests: pytest does not collect them).

Run from the repository root::

    python -m benchmarks calibrate --quick     # W0: Postgres commits/s, Celery no-op tasks/s
    python -m benchmarks linear --quick        # W1: leaseflow vs plain chain vs naive durable
    python -m benchmarks recovery --quick      # W5: kill -9 mid-state, time to restart
    python -m benchmarks backlog --quick       # W8: claim latency at 1k / 100k (full: 1M) rows
    python -m benchmarks fanout --quick        # W3 quick profile (~1 min)
    python -m benchmarks fanout                # W3 full profile (100x10 and 10x100)
    python -m benchmarks fanout --widths 10 --runs 50

Each workload is a module with ``HELP``, ``add_arguments(parser)`` and ``run(args)``,
listed in ``benchmarks.__main__.WORKLOADS``. Results are written up in
``benchmarks/RESULTS.md``; see ``/work/shared/BENCHMARKS.md`` for the ground rules.
"""
