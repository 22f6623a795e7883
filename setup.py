from setuptools import find_packages, setup

setup(
    name="mtp",
    version="0.1.0",
    description="Multi-token prediction language models in JAX/Flax: train, retrofit, decode faster.",
    python_requires=">=3.10",
    packages=find_packages(include=["mtp", "mtp.*", "configs"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={"dev": ["pytest>=8", "ruff>=0.6"]},
    entry_points={"console_scripts": ["mtp=mtp.cli:main"]},
)
