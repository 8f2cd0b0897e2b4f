"""Packaging glue that pyproject.toml cannot express: the repository's ``weights/``
folder is installed as the data-only package ``fsr._weights`` (see pyproject.toml),
so an installed wheel carries the shipped models."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["fsr", "fsr.*"]) + ["fsr._weights"])
