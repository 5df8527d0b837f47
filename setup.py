"""Package list for setuptools (metadata, dependencies and package data are in pyproject.toml).

The wheel holds `rlx`, `analysis` (run as `python -m analysis` or `rlx report`) and the top-level
`recipes/` and `accelerate_configs/` as the data packages `rlx.recipes` and `rlx.accelerate_configs`.
`benchmarks/` stays in the repository (run from a checkout: `python -m benchmarks.run`).
"""

from setuptools import find_namespace_packages, setup

DATA = {"rlx.recipes": "recipes", "rlx.accelerate_configs": "accelerate_configs"}

setup(
    # namespace discovery: several rlx folders (config/, trainers/, ...) have no __init__.py
    packages=[
        *find_namespace_packages(
            include=["rlx", "rlx.*", "analysis", "analysis.*"], exclude=["*__pycache__*"]
        ),
        *DATA,
    ],
    package_dir=DATA,
)
