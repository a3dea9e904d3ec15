"""groupvit-triton: GroupViT with fused Triton kernels for the grouping assignment and the contrastive loss."""

from pathlib import Path

from setuptools import setup

here = Path(__file__).parent


def _reqs(name: str) -> list[str]:
    lines = (here / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip() and not ln.startswith("-r")]


setup(
    name="groupvit-triton",
    version="0.1.0",
    description="GroupViT (hierarchical grouping ViT, zero-shot segmentation) with fused Triton kernels",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # LICENSE; the bundled CLIP vocabulary keeps its own (groupvit/assets/LICENSE-CLIP.txt)
    packages=["kernels", "groupvit", "train", "bench"],
    package_data={"groupvit": ["assets/bpe_simple_vocab_16e6.txt.gz", "assets/LICENSE-CLIP.txt"]},
    python_requires=">=3.10",
    # torch is pinned loosely here so GPU users keep their own CUDA build; CPU machines install through
    # constraints.txt (see README), which pins the CPU wheel.
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "numpy",
        "webdataset>=1.0",
        "braceexpand",
        "pillow",
        "simplejpeg",
        "ftfy",
        "regex",
        "nltk>=3.9",
        "tqdm",
    ],
    extras_require={"dev": [r for r in _reqs("requirements-dev.txt") if r not in _reqs("requirements.txt")]},
    entry_points={
        "console_scripts": [
            "groupvit-train=train.__main__:main",
            "groupvit-segment=groupvit.segment_cli:main",
        ]
    },
)
