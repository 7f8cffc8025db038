"""Build dmrepl and its Cython kernel layer (cext/ -> dmrepl._kernel)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "dmrepl._kernel",
        sources=["cext/_kernel.pyx"],
        include_dirs=["cext"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
]

setup(
    ext_modules=cythonize(extensions, include_path=["cext"],
                          compiler_directives={"language_level": 3}),
)
