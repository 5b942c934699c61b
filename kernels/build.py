"""JIT build of the wkv6 extensions (torch.utils.cpp_extension + ninja), cached by toolchain.

Build directory: `${GT_KERNEL_CACHE:-~/.cache/groundthink/kernels}/<backend>-<key>/`, where key hashes
the sources and build flags, the torch version, the CUDA version torch was built with, the Python
ABI, the target arch (GPU compute capability, or the CPU's instruction-set flags since the CPU
build uses -march=native) and the directory of the torch install whose headers it compiles against.
The sources are copied into `<build dir>/src/` and compiled from there, so the build files name
only paths inside the build directory: two checkouts with the same sources (and venvs with the
same torch install) share one build and never recompile each other's. A rebuild happens only when
one of those inputs changes. A file lock beside the
directory keeps two processes from compiling into it at once; `build_info.json` is written last,
so its presence means "this directory holds a finished build".

A failed compile raises RuntimeError carrying the compiler's output. Nothing falls back silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = {
    "cpu": ["wkv6_cpu.cpp"],
    "cuda": ["wkv6_cuda_bind.cpp", "wkv6_cuda.cu", "wkv6_chunk.cu"],
}
CPU_CFLAGS = ("-O3", "-march=native", "-fopenmp")
CPU_LDFLAGS = ("-fopenmp",)  # resolves to libgomp.so.1, the soname torch's own OpenMP runtime has
CUDA_CFLAGS = ("-O3", "-Xptxas=-O3", "--extra-device-vectorization", "-lineinfo")
# Tuples on purpose: cpp_extension.load appends to the flag lists it is given, which would change
# source_hash() (and every cache key downstream) after the first build in a process. It gets copies.
HEAD_SIZES_CUDA = (32, 64, 128)  # K = V; instantiated in wkv6_cuda.cu

_LOADED: dict[str, Any] = {}  # backend -> loaded module (one per process)


def cache_root() -> Path:
    return Path(os.environ.get("GT_KERNEL_CACHE", "~/.cache/groundthink/kernels")).expanduser()


def resolve_backend(device: str | torch.device = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible else 'cpu'; accepts 'cpu', 'cuda', 'cuda:N'."""
    dev = str(device)
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        return "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"wkv6: backend {dev!r} requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'"
            )
        return "cuda"
    raise ValueError(f"wkv6: unknown device {device!r}; expected 'auto', 'cpu' or 'cuda'")


def _cpu_arch() -> str:
    """Machine plus a hash of the CPU's feature flags (the build uses -march=native)."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def _cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def source_hash(backend: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES[backend]:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    flags = CPU_CFLAGS + CPU_LDFLAGS if backend == "cpu" else CUDA_CFLAGS
    h.update(json.dumps(list(flags)).encode())
    return h.hexdigest()


def toolchain_fingerprint(device: str | torch.device = "auto") -> dict:
    """What the compiled extension depends on (cheap: no compiler is run). Hash it for cache keys."""
    backend = resolve_backend(device)
    return {
        "backend": backend,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "arch": _cuda_arch() if backend == "cuda" else _cpu_arch(),
        "source_hash": source_hash(backend),
        "python_abi": f"{sys.implementation.cache_tag}-{platform.system().lower()}",
    }


def _fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({cmd[0]}: {e})"
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0].strip() if lines else f"unknown ({cmd[0]})"


def _compiler_info(backend: str) -> str:
    cxx = os.environ.get("CXX", "c++")
    info = _first_line([cxx, "--version"])
    if backend == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else "nvcc"
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            rel = [ln for ln in out.splitlines() if "release" in ln]
            info = f"nvcc {rel[-1].split('release')[-1].strip() if rel else 'unknown'}; host {info}"
        except (OSError, subprocess.TimeoutExpired) as e:
            info = f"nvcc unavailable ({e}); host {info}"
    return info


def _check_toolchain(backend: str) -> None:
    """Fail early, with the fix, when a tool the build needs is missing."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"wkv6: no C++ compiler ({cxx!r} not on PATH) to build the {backend} extension. "
            "Install one (Debian/Ubuntu: `apt-get install g++`) or point CXX at it."
        )
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError as e:
        raise RuntimeError(f"wkv6: ninja is required to build the extension ({e}); `pip install ninja`") from e
    if backend == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            raise RuntimeError(
                "wkv6: CUDA_HOME not found, so nvcc cannot build the CUDA extension. Install the CUDA "
                f"toolkit matching torch's CUDA {torch.version.cuda} and set CUDA_HOME."
            )


@contextlib.contextmanager
def _env(**kv: str):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stage_sources(backend: str, src_dir: Path) -> None:
    """Copy the backend's sources into the build directory, rewriting only files whose bytes differ
    (an unchanged mtime keeps ninja from rebuilding)."""
    src_dir.mkdir(parents=True, exist_ok=True)
    for name in SOURCES[backend]:
        data = (CSRC / name).read_bytes()
        dest = src_dir / name
        if dest.is_file() and dest.read_bytes() == data:
            continue
        tmp = dest.with_name(f".{name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)


def write_json_atomic(path: Path, obj: Any) -> None:
    """obj as indented JSON at path, through a temp file beside it and os.replace: a reader (or a run stopped
    part-way) never sees half a file."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _build_key(fp: dict) -> str:
    """The build directory's key: the toolchain fingerprint plus the torch install compiled against."""
    return _fingerprint_key({**fp, "torch_dir": str(Path(torch.__file__).resolve().parent)})


def _load(backend: str, name: str, build_dir: Path):
    from torch.utils.cpp_extension import load

    src_dir = build_dir / "src"
    _stage_sources(backend, src_dir)
    sources = [str(src_dir / s) for s in SOURCES[backend]]
    if backend == "cpu":
        return load(name=name, sources=sources, build_directory=str(build_dir),
                    extra_cflags=list(CPU_CFLAGS), extra_ldflags=list(CPU_LDFLAGS), verbose=False)
    major, minor = torch.cuda.get_device_capability()
    # Compile for this GPU only (cpp_extension otherwise derives the list itself).
    with _env(TORCH_CUDA_ARCH_LIST=f"{major}.{minor}"):
        return load(name=name, sources=sources, build_directory=str(build_dir),
                    extra_cflags=["-O3"], extra_cuda_cflags=list(CUDA_CFLAGS), verbose=False)


def build_extension(device: str = "auto") -> dict:
    """Build (or find already built) the wkv6 extension for this machine and load it.

    Returns {backend, arch, compiler, torch_version, cuda_version, build_dir, build_seconds,
    cache_hit, source_hash}. Raises RuntimeError with the compiler's message when the build fails.
    """
    from filelock import FileLock

    backend = resolve_backend(device)
    fp = toolchain_fingerprint(backend)
    key = _build_key(fp)
    root = cache_root()
    build_dir = root / f"{backend}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    info_path = build_dir / "build_info.json"
    t0 = time.perf_counter()
    with FileLock(str(root / f"{backend}-{key}.lock")):
        cache_hit = info_path.exists()
        if backend not in _LOADED:
            _check_toolchain(backend)
            try:
                _LOADED[backend] = _load(backend, f"gt_wkv6_{backend}_{key[:8]}", build_dir)
            except Exception as e:  # the compiler's output is in the message; never fall back
                raise RuntimeError(
                    f"wkv6: building the {backend} extension in {build_dir} failed:\n{e}\n"
                    "Fix the toolchain (C++ compiler, ninja" + (", nvcc/CUDA_HOME" if backend == "cuda" else "")
                    + ") or report the compiler error above."
                ) from e
        info = {
            **{k: fp[k] for k in ("backend", "arch", "torch_version", "cuda_version", "source_hash")},
            "compiler": _compiler_info(backend),
            "build_dir": str(build_dir),
            "build_seconds": round(time.perf_counter() - t0, 3),
            "cache_hit": cache_hit,
        }
        if not cache_hit:
            write_json_atomic(info_path, info)  # written last: marks a finished build
    return info


def get_extension(backend: str):
    """The loaded module for 'cpu' or 'cuda', building it on first use."""
    if backend not in _LOADED:
        build_extension(backend)
    return _LOADED[backend]
