"""Builds vispec._C with CMake (CMakeLists.txt); metadata lives in pyproject.toml.

Environment:
  VISPEC_CUDA=0/1          force the CUDA kernels off/on (default: on when torch has
                           CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0" (default "8.0;8.6;8.9;9.0")
  MAX_JOBS                 parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _want_cuda(torch):
    flag = os.environ.get("VISPEC_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"VISPEC_CUDA must be 0 or 1, got {flag!r}")
        if flag == "1" and torch.version.cuda is None:
            raise SystemExit("VISPEC_CUDA=1 but the installed torch has no CUDA support")
        if flag == "1" and _find_nvcc() is None:
            raise SystemExit("VISPEC_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return flag == "1"
    return torch.version.cuda is not None and _find_nvcc() is not None


def _arch_list(arch_list):
    """Checks a TORCH_CUDA_ARCH_LIST such as '8.0;9.0+PTX' (';', ',' or spaces between entries) -> '8.0;9.0+PTX'.

    Torch's CMake config owns the CUDA arch flags: it turns TORCH_CUDA_ARCH_LIST into -gencode flags and sets
    CMAKE_CUDA_ARCHITECTURES to OFF (with a warning, seen on an H200), so the list reaches nvcc as the CMake
    variable TORCH_CUDA_ARCH_LIST (before this, a build without the environment variable got torch's list, not ours)."""
    out = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        num = item.removesuffix("+PTX").replace(".", "")
        if not num.isdigit() and not (num[:-1].isdigit() and num[-1] == "a"):
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not like '9.0' or '9.0+PTX'")
        out.append(item)
    return ";".join(out)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda(torch)
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DVISPEC_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if cuda:
            archs = _arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
            args += [f"-DTORCH_CUDA_ARCH_LIST={archs}", f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}"]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"vispec: building {'CPU + CUDA' if cuda else 'CPU-only'} extension", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[Extension("vispec._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
