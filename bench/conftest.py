"""Every pytest-benchmark JSON of these suites records what it ran on (``environment.describe``:
machine, versions, allocator settings, fused-op backend) under ``machine_info["fastmae"]``."""


def pytest_benchmark_update_machine_info(config, machine_info):
    from fastmae.bench.environment import describe

    machine_info["fastmae"] = describe()
