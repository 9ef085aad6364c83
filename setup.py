"""Build and install fastmem.

The pure Python + Triton package always installs. The native backend `fastmem._native` (CPU threads,
plus CUDA kernels when enabled) is built by CMake; if CMake, a compiler or the build itself fails, the
install still succeeds without it and prints a warning saying why.

Environment switches:
  FASTMEM_CUDA=0|1          force the CUDA kernels off / on. Unset: on when `nvcc` is found AND an
                            importable torch reports a CUDA build (with build isolation torch is not
                            importable: use `pip install --no-build-isolation .` or FASTMEM_CUDA=1).
  FASTMEM_CUDA_ARCHS="80;90"  CUDA architectures (CMake list; default 80;90).
  FASTMEM_REQUIRE_NATIVE=1  make any native build failure fatal (CI).
  FASTMEM_SKIP_NATIVE=1     do not even try to build the native backend.
  FASTMEM_CPU_NATIVE=1      compile the CPU backend with -march=native (faster here, not portable).
  MAX_JOBS=N                parallel compile jobs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def _log(message: str) -> None:
    print(f"fastmem: {message}", file=sys.stderr, flush=True)


def _find_cmake() -> str | None:
    try:  # the `cmake` wheel from the build requirements
        import cmake  # type: ignore

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.exists():
            return str(candidate)
    except Exception:
        pass
    return shutil.which("cmake")


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _torch_cuda_version() -> tuple[bool, str | None]:
    """(torch importable by the build interpreter?, its torch.version.cuda or None)."""
    try:
        result = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda or '')"],
                                capture_output=True, text=True, timeout=300)
    except Exception:
        return False, None
    if result.returncode != 0:
        return False, None
    lines = result.stdout.strip().splitlines()
    return True, (lines[-1].strip() or None) if lines else None


def _cuda_decision() -> tuple[bool, bool, str]:
    """(build CUDA?, forced by FASTMEM_CUDA?, reason)."""
    forced = _flag("FASTMEM_CUDA")
    if forced is not None:
        return forced, True, f"FASTMEM_CUDA={int(forced)}"
    nvcc = _find_nvcc()
    if nvcc is None:
        return False, False, "no nvcc found"
    importable, torch_cuda = _torch_cuda_version()
    if not importable:
        return False, False, ("nvcc found but torch is not importable in the build environment (pip's build "
                              "isolation: use --no-build-isolation with a CUDA torch, or FASTMEM_CUDA=1)")
    if not torch_cuda:
        return False, False, "nvcc found but the installed torch is a CPU build (FASTMEM_CUDA=1 forces CUDA)"
    return True, False, f"nvcc at {nvcc}, torch CUDA {torch_cuda}"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Builds CMakeExtensions with CMake; a failed native build warns instead of failing the install."""

    def run(self) -> None:
        if _flag("FASTMEM_SKIP_NATIVE"):
            self._give_up("FASTMEM_SKIP_NATIVE=1")
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to pure Python
            if _flag("FASTMEM_REQUIRE_NATIVE"):
                raise
            self._give_up(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)

    def _give_up(self, why: str) -> None:
        self.extensions = []  # nothing to copy in place or to list as an output
        _log("WARNING: the native backend (fastmem._native) was NOT built: "
             f"{why}. Installing pure Python + Triton only; set FASTMEM_REQUIRE_NATIVE=1 to make this "
             "an error.")

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("CMake not found (pip install cmake)")
        want_cuda, forced, reason = _cuda_decision()
        _log(f"CUDA kernels {'ON' if want_cuda else 'OFF'} ({reason})")
        if want_cuda:
            try:
                self._cmake_build(ext, cmake, cuda=True)
                return
            except Exception as exc:  # noqa: BLE001
                if forced and _flag("FASTMEM_REQUIRE_NATIVE"):
                    raise
                _log(f"WARNING: the CUDA build failed ({exc}); building the CPU backend only.")
        self._cmake_build(ext, cmake, cuda=False)

    def _cmake_build(self, ext: CMakeExtension, cmake: str, cuda: bool) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ("cmake-cuda" if cuda else "cmake-cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DFASTMEM_VERSION={VERSION}",
            f"-DFASTMEM_CUDA={'ON' if cuda else 'OFF'}",
        ]
        args.append(f"-DFASTMEM_CPU_NATIVE={'ON' if _flag('FASTMEM_CPU_NATIVE') else 'OFF'}")
        archs = os.environ.get("FASTMEM_CUDA_ARCHS")
        if archs:
            args.append(f"-DFASTMEM_CUDA_ARCHS={archs.replace(',', ';')}")
        if cuda and _find_nvcc() and not os.environ.get("CUDACXX"):
            args.append(f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}")
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            raise RuntimeError("pybind11 not importable in the build environment (pip install pybind11)")
        if self._stale_cache(build_dir, cmake):
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("CMAKE_GENERATOR") and not (build_dir / "CMakeCache.txt").exists():
            try:
                import ninja  # type: ignore

                args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
            except ImportError:
                if shutil.which("ninja"):
                    args += ["-GNinja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        self._run([cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args])
        self._run([cmake, "--build", str(build_dir), "--config", config, "--parallel", jobs])

    @staticmethod
    def _stale_cache(build_dir: Path, cmake: str) -> bool:
        """A CMake cache left by another build environment (pip's isolated envs are temporary): its
        cmake or make program is gone or differs from ours, so the build dir must start over."""
        cache = build_dir / "CMakeCache.txt"
        if not cache.exists():
            return False
        entries = {}
        for line in cache.read_text(errors="replace").splitlines():
            if "=" in line and ":" in line.split("=", 1)[0]:
                key, value = line.split("=", 1)
                entries[key.split(":", 1)[0]] = value
        if Path(entries.get("CMAKE_COMMAND", "")).resolve() != Path(cmake).resolve():
            return True
        make = entries.get("CMAKE_MAKE_PROGRAM", "")
        return bool(make) and not Path(make).exists()

    @staticmethod
    def _run(cmd: list[str]) -> None:
        _log("$ " + " ".join(cmd))
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stderr.write(result.stdout)
        if result.returncode != 0:
            lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
            # The first error line says most (compiler missing, syntax error, ...); fall back to the last.
            errors = [n for n, line in enumerate(lines) if "error" in line.lower() and "errors occurred" not in line]
            detail = " ".join(lines[errors[0]:errors[0] + 2]) if errors else (lines[-1] if lines else "no output")
            raise RuntimeError(f"`{Path(cmd[0]).name} {cmd[1]}` failed (exit code {result.returncode}): {detail}")


def _packages() -> list[str]:
    # Everything under fastmem/, plus the repo's kernels/ directory installed as fastmem.kernels
    # (never as a top-level `kernels`: transformers imports Hugging Face's own package by that name).
    found = set(find_packages(include=["fastmem", "fastmem.*"]))
    found |= {"fastmem", "fastmem.ops", "fastmem.kernels"}
    found |= {f"fastmem.kernels.{name}" for name in find_packages(where="kernels")}
    return sorted(found)


setup(
    name="fastmem",
    version=VERSION,
    description="Fast test-time learning with latent memories: memory-injected attention kernels, batched per-memory training, the online loop",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir={"fastmem": "fastmem", "fastmem.kernels": "kernels"},
    include_package_data=False,
    package_data={"fastmem": ["assets/default_model/*"]},
    ext_modules=[CMakeExtension("fastmem._native")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "transformers>=4.56",
        "peft",
        "math-verify",
        "datasets",  # --data: JSONL, JSON, CSV and Parquet through its local loaders
        "tqdm",
        "rich",
        "triton; sys_platform == 'linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        # pybind11 and g++ build the CUDA-kernel host emulator in tests; faiss checks FAISS search; gguf reads
        # the real model's GGUF file (scripts/real_model.py); optimum-quanto is the quantized cache tested.
        "test": ["pytest", "pytest-xdist", "hypothesis", "matplotlib", "pybind11", "faiss-cpu", "gguf",
                 "optimum-quanto"],
        "gguf": ["gguf"],
        "bench": ["matplotlib"],
        "faiss": ["faiss-cpu"],
    },
    zip_safe=False,
)
