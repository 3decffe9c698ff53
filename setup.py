"""Package set-up: `pip install -e .[dev]` (tests) or `.[gpu]` (flash-attn on CUDA machines).

Install torch==2.13.0 first (see README) so that no dependency pulls a different torch build."""
import os

from setuptools import find_packages, setup


def reqs(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements", name)
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip() and not line.startswith("#")]


setup(
    name="megatron-post-training",
    version="0.1.0",
    description="Megatron-style distributed post-training (SFT, RM, DPO family, KTO) on DeepSpeed",
    packages=find_packages(include=["megatron", "megatron.*"]),
    package_data={"megatron.data": ["templates/*"], "megatron.frontier": ["refusal_phrases.txt", "judge_template.yml"]},
    python_requires=">=3.10",
    install_requires=reqs("base.txt"),
    extras_require={"gpu": reqs("gpu.txt"), "dev": reqs("dev.txt")},
)
