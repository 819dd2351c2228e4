"""Builds the compiled extension `moe_runtime._C`; package metadata lives in pyproject.toml.

Install with `pip install --no-build-isolation -e .` so the extension compiles against the
torch already installed. The CPU sources always build; the CUDA sources build only when torch
is a CUDA build and nvcc is found (CUDA_HOME), never by probing a GPU, for the architectures in
TORCH_CUDA_ARCH_LIST. Environment switches:
  MOE_RUNTIME_FORCE_CUDA=1  build the CUDA sources or fail loudly (used by the compile check);
  MOE_RUNTIME_NO_EXT=1      build no extension at all (pure-Python install).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = Path("csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in {"1", "true", "yes", "on"}


def _extensions() -> tuple[list, dict]:
    """The extension modules and the build_ext command (none when MOE_RUNTIME_NO_EXT is set)."""
    if _flag("MOE_RUNTIME_NO_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    nvcc = Path(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and nvcc.is_file()
    if _flag("MOE_RUNTIME_FORCE_CUDA") and not with_cuda:
        raise RuntimeError(
            "MOE_RUNTIME_FORCE_CUDA=1 needs a CUDA build of torch and nvcc under CUDA_HOME; found "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    # at::parallel_for is an OpenMP region compiled into the caller (ATen/ParallelOpenMP.h): without
    # -fopenmp it runs serially. The extension then uses torch's own libgomp (same soname, found
    # through the rpath below), so torch.set_num_threads governs its threads too.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    args = {"cxx": ["-O3", *openmp]}
    if with_cuda:
        sources += sorted(str(p) for p in CSRC.glob("cuda/*.cu"))
        args["nvcc"] = ["-O3"]
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    # The rpath lets `import moe_runtime._C` find libtorch (and cudart) even before `import torch`.
    lib_dirs = cpp_extension.library_paths(device_type="cuda" if with_cuda else "cpu")
    rpath = [f"-Wl,-rpath,{path}" for path in lib_dirs] + openmp
    ext = make(
        "moe_runtime._C", sources, extra_compile_args=args, extra_link_args=rpath, py_limited_api=False
    )
    build = cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())
    return [ext], {"build_ext": build}


os.chdir(ROOT)  # source paths are relative to the repository root
ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
