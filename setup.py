"""The one thing pyproject.toml cannot say: qkov's optional C extension (``qkov.fastpath._native``).

It is optional: where no C compiler is found the build says so and qkov installs without it,
running the same maths through torch (see ``src/qkov/fastpath/native.py``).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fopenmp-simd", "-std=gnu11"]

setup(ext_modules=[Extension("qkov.fastpath._native", ["src/qkov/fastpath/_native.c"],
                             extra_compile_args=flags, optional=True)])
