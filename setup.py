"""Builds the optional C extension ftrans._C._fastc (everything else is in pyproject.toml).

Where no C compiler is present the build of the extension fails quietly and ftrans runs its
pure-Python path (``ftrans._C.torch_function.C_ENTRY`` says which one is in use).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("ftrans._C._fastc", ["ftrans/_C/_fastc.c"], optional=True)])
