"""Maps the top-level ``workers/`` and ``plugins/`` folders to ``patchd.workers``/``patchd.plugins``.

Everything else about the distribution is in pyproject.toml.
"""

from setuptools import find_packages, setup


def mapped(folder: str, prefix: str) -> list[str]:
    found = find_packages(include=[folder, f"{folder}.*"])
    return [prefix + name[len(folder) :] for name in found]


setup(
    packages=find_packages(include=["patchd", "patchd.*"])
    + mapped("workers", "patchd.workers")
    + mapped("plugins", "patchd.plugins"),
    package_dir={"patchd": "patchd", "patchd.workers": "workers", "patchd.plugins": "plugins"},
)
