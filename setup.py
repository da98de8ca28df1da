"""Build the Cython modules (MVCC core, watch matcher, wire encoders); the rest is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(name, [f"src/{name.replace('.', '/')}.pyx"], extra_compile_args=["-O3"])
    for name in ("fastetcd._core", "fastetcd._watch_index", "fastetcd.server._wire")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
        },
    ),
)
