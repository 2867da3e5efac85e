"""Benchmarks for the sidecar: ``python -m bench [heartbeat|select|all] [--quick]``.

Each figure is reported next to a baseline measured in the same run (a bare grpc.aio
echo server, see ``bench/echo.py``), as a ratio; the process under test always runs in a
child process of its own, apart from the load generator. Results: ``docs/benchmarks.md``.
"""
