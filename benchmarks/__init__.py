"""leaseflow benchmarks (not tests: pytest does not collect them).

Run from the repository root::

    python -m benchmarks fanout --quick        # W3 quick profile (~1 min)
    python -m benchmarks fanout                # W3 full profile (100x10 and 10x100)
    python -m benchmarks fanout --widths 10 --runs 50

Each workload is a module with ``HELP``, ``add_arguments(parser)`` and ``run(args)``,
listed in ``benchmarks.__main__.WORKLOADS``. Results are written up in
``benchmarks/RESULTS.md``; see ``/work/shared/BENCHMARKS.md`` for the ground rules.
"""
