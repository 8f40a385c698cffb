"""Build bertfast: the Python package, the Triton kernels (as bertfast.kernels)."""

from setuptools import setup

setup(
    name="bertfast",
    version="0.1.0",
    description="A custom-kernel performance engine for BERT: Triton and C++/CUDA kernels, HF-compatible.",
    python_requires=">=3.10",
    packages=["bertfast", "bertfast.ops", "bertfast.kernels", "bertfast.benchmarking"],
    package_dir={"bertfast": "bertfast", "bertfast.kernels": "kernels"},
    install_requires=["torch>=2.11", "safetensors", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=4.48"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["bertfast = bertfast.cli:main"]},
)
