"""Build the Cython modules (MVCC core, watch matcher, wire encoders, the commit log's writer thread, the
native HTTP/2 transport); the rest is in pyproject.toml."""
import shlex
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup


def pkg_config(package: str, fallback_libs: list[str]) -> dict[str, list[str]]:
    """Compiler and linker flags for ``package`` from pkg-config, or a plain -l when it is absent."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", package], check=True, capture_output=True,
                                text=True).stdout
        libs = subprocess.run(["pkg-config", "--libs", package], check=True, capture_output=True,
                              text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"libraries": fallback_libs}
    out: dict[str, list[str]] = {"include_dirs": [], "library_dirs": [], "libraries": []}
    for flag in shlex.split(cflags):
        if flag.startswith("-I"):
            out["include_dirs"].append(flag[2:])
    for flag in shlex.split(libs):
        if flag.startswith("-L"):
            out["library_dirs"].append(flag[2:])
        elif flag.startswith("-l"):
            out["libraries"].append(flag[2:])
    out["libraries"] = out["libraries"] or fallback_libs
    return out


extensions = [
    Extension(name, [f"src/{name.replace('.', '/')}.pyx"], extra_compile_args=["-O3"])
    for name in ("fastetcd._core", "fastetcd._watch_index", "fastetcd.server._wire", "fastetcd.store._log_writer")
]
# HTTP/2 + gRPC over libnghttp2 (Debian: libnghttp2-dev). Optional: without the headers the build skips it
# with a warning, and fastetcd runs on grpcio (`--transport native` then says what to install).
extensions.append(
    Extension(
        "fastetcd.server._native",
        ["src/fastetcd/server/_native.pyx"],
        extra_compile_args=["-O2"],
        **pkg_config("libnghttp2", ["nghttp2"]),
    )
)
OPTIONAL = {"fastetcd.server._native"}

ext_modules = cythonize(
    extensions,
    compiler_directives={
        "language_level": "3",
        "boundscheck": False,
        "wraparound": False,
        "initializedcheck": False,
        "cdivision": True,
    },
)
for ext in ext_modules:
    # Set after cythonize, which rebuilds the Extension objects without this flag.
    ext.optional = ext.name in OPTIONAL

setup(ext_modules=ext_modules)
