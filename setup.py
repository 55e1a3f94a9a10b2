"""Builds the C++ kernels (csrc/, CMake + pybind11) as edgefed._kernels."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if shutil.which("cmake") is None:
            raise RuntimeError("building edgefed's kernels needs CMake >= 3.18: "
                               "`apt-get install cmake` or `pip install cmake`, then retry")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build = Path(self.build_temp).resolve() / ext.name
        build.mkdir(parents=True, exist_ok=True)
        native = os.environ.get("EDGEFED_NATIVE", "0")  # every SIMD path is built in and dispatched
        cfg = ["cmake", str(ROOT), f"-DPython_EXECUTABLE={sys.executable}",
               "-DCMAKE_BUILD_TYPE=Release", f"-DEDGEFED_NATIVE={'ON' if native != '0' else 'OFF'}",
               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}"]
        subprocess.run(cfg, cwd=build, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", ".", "--target", "_kernels", "-j", jobs], cwd=build, check=True)
        built = next(out.parent.glob("_kernels*" + Path(out).suffix), None)
        if built is None:
            raise RuntimeError(f"CMake finished but no _kernels module in {out.parent}")
        if built.resolve() != out:
            shutil.move(str(built), out)
        # The CUDA kernels are compiled at run time (NVRTC, edgefed/cuda_kernels.py): a wheel carries
        # their source. A checkout (editable install) reads csrc/ itself.
        if out.parent != ROOT / "edgefed":
            dest = out.parent / "_cuda_src"
            for rel in CUDA_SOURCES:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / "csrc" / rel, dest / rel)


CUDA_SOURCES = ("hd.hpp", "philox.hpp", "normal.hpp", "cuda/seeded_blocks.hpp", "cuda/seeded.cu")
TORCH = "torch>=2.1,<2.14"  # 2.13.0 (CPU) is the tested build
setup(
    name="edgefed",
    version="0.1.0",
    description="Federated post-training of language models on devices people own",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["edgefed", "edgefed.*"]) + ["edgefed_server"],
    package_dir={"edgefed_server": "server"},
    # Device classes land in <prefix>/share/edgefed/device_configs (edgefed.device_config looks there).
    data_files=[("share/edgefed/device_configs", sorted(str(p.relative_to(ROOT)) for p in
                                                        (ROOT / "device_configs").glob("*.yaml")))],
    ext_modules=[CMakeExtension("edgefed._kernels")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["numpy>=1.22", "onnxruntime>=1.16", "paho-mqtt>=2.0"],
    extras_require={
        # cryptography: Ed25519 message signatures, TLS material (edgefed certs), secure
        # aggregation's X25519 / AES-GCM / ChaCha20; pycryptodome: its Shamir secret sharing.
        "device": ["numpy>=1.22", "onnxruntime>=1.16", "paho-mqtt>=2.0", "tokenizers>=0.15",
                   "pyyaml>=6", "tqdm>=4.60", "cryptography>=41", "pycryptodome>=3.19"],
        "host": [TORCH, "transformers>=4.45", "peft>=0.10", "onnx>=1.15", "onnxscript>=0.1",
                 "gguf>=0.10", "accelerate>=0.30", "tokenizers>=0.15", "tqdm>=4.60", "jinja2>=3.1",
                 "pyarrow>=12", "rouge-score>=0.1.2", "matplotlib>=3.5"],
        # Parquet files and saved `datasets` directories (devices read JSONL/CSV/TSV without it).
        "formats": ["pyarrow>=12"],
        # Pinned: transport/broker.py overrides amqtt 0.12's private _initialize_client_session.
        "server": ["cryptography>=41", "pycryptodome>=3.19", "prometheus_client>=0.17", "amqtt>=0.12.1,<0.13", "pyyaml>=6", "tqdm>=4.60", "matplotlib>=3.5", "rouge-score>=0.1.2",
                   "pyarrow>=12", "dp-accounting>=0.6,<0.7"],
        # The DP accountant alone (the aggregation server imports it only for dp_mode jobs).
        "dp": ["dp-accounting>=0.6,<0.7"],
        # hardware in the loop on boards from an inventory, over ssh (edgefed/hil_remote.py)
        "hil": ["paramiko>=3.4", "pyyaml>=6"],
        # GPU hosts: the seeded kernels on CUDA (edgefed/cuda_kernels.py), compiled by NVRTC at first
        # use; no toolkit needed. Pick the extra of the CUDA major your driver and torch build use
        # (torch.version.cuda): the bindings load that major's NVRTC.
        "cuda12": ["cuda-bindings>=12.6,<13", "nvidia-cuda-nvrtc-cu12>=12.6,<13"],
        "cuda13": ["cuda-bindings>=13,<14", "nvidia-cuda-nvrtc>=13,<14"],
        # nvrtc-cu12: tests compile the CUDA kernels to PTX (no GPU needed) and read the arithmetic.
        "dev": ["pytest>=7", "scipy>=1.9", "matplotlib>=3.5", "hypothesis>=6", "paramiko>=3.4",
                "cuda-bindings>=12.6,<13", "nvidia-cuda-nvrtc-cu12>=12.6,<13"],
    },
    entry_points={"console_scripts": ["edgefed=edgefed.cli:main"]},
    zip_safe=False,
)
