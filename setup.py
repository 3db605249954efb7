"""Build vpit_fast and its compiled extension vpit_fast._C.

    pip install -e . --no-build-isolation

Environment switches (printed in the build log):
    VPIT_FAST_CPU_ONLY=1          build the CPU kernels only, even when CUDA is available
    VPIT_FAST_CUDA_ARCHS="8.0;9.0" compute capabilities to compile for (default 8.0 and 9.0;
                                  "9.0a" compiles sm_90a)
    MAX_JOBS=N                    parallel compile jobs (ninja)
    VPIT_FAST_DEBUG=1             -O0 -g, and -lineinfo for CUDA
"""

import glob
import os
import re

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:  # pragma: no cover - a clear message beats a traceback from deep in setuptools
    raise SystemExit(
        "vpit_fast needs PyTorch installed before it builds: `pip install torch` first, then "
        "`pip install -e . --no-build-isolation` (build isolation would fetch another torch)."
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(ROOT, "vpit_fast", "__init__.py")).read()).group(1)


def log(message):
    print(f"[vpit_fast build] {message}", flush=True)


def want_cuda():
    if os.environ.get("VPIT_FAST_CPU_ONLY", "0") == "1":
        return False, "VPIT_FAST_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc under {cpp_extension.CUDA_HOME}"


def cuda_arch_flags(archs):
    flags = []
    for arch in archs:
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
    return flags


def extension():
    with_cuda, reason = want_cuda()
    sources = sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/torch/*.cpp") + ["python/bindings.cpp"])
    if not with_cuda:
        sources = [s for s in sources if not s.endswith("_cuda.cpp")]
    debug = os.environ.get("VPIT_FAST_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [
        f'-DVPIT_FAST_VERSION="{VERSION}"',
        f'-DVPIT_FAST_TORCH_VERSION="{torch.__version__}"',
    ]
    cxx = ["-std=c++17"] + opt + defines
    archs = []
    if with_cuda:
        archs = [a.strip() for a in os.environ.get("VPIT_FAST_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";") if a.strip()]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cuda_define = ["-DVPIT_FAST_WITH_CUDA", f'-DVPIT_FAST_CUDA_ARCHS="{";".join(archs)}"']
        cxx += cuda_define
        nvcc = ["-std=c++17", "-O3"] + cuda_arch_flags(archs)
        nvcc += ["-lineinfo"] if debug else []
        nvcc += defines + cuda_define
        log(f"CUDA build ({reason}); archs {archs}")
        log(f"nvcc flags: {' '.join(nvcc)}")
        ext = cpp_extension.CUDAExtension(
            "vpit_fast._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}
        )
    else:
        log(f"CPU-only build ({reason})")
        ext = cpp_extension.CppExtension("vpit_fast._C", sources, extra_compile_args={"cxx": cxx})
    log(f"c++ flags: {' '.join(cxx)}")
    log(f"sources: {' '.join(sources)}")
    return ext


setup(
    name="vpit_fast",
    version=VERSION,
    packages=find_packages(include=["vpit_fast", "vpit_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
