"""Build script. The package is pure Python in this version: there is no CUDA extension yet,
so nothing is compiled and nothing pretends to be. (The fused kernels arrive with the
``csrc/`` sources; see the README's roadmap.)"""

from setuptools import setup

setup()
