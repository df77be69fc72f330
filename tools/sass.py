"""Developer tool: count SASS instructions of a compiled CUDA object (e.g. that the bf16/fp16 Gram
kernels are made of tensor-core ``HMMA`` instructions). Used by ``tests/ops/test_cuda_extension.py``.

    python tools/sass.py build/statistics_kernels.o HMMA
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from build_cuda import cuda_home


def cuobjdump() -> Path:
    """``cuobjdump`` of the CUDA toolkit, else the copy Triton ships (the toolkit may omit it)."""
    candidates = [cuda_home() / "bin" / "cuobjdump"]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    candidates += [Path(found)] if found else []
    for path in candidates:
        if path.exists():
            return path
    raise RuntimeError("cuobjdump not found (CUDA toolkit or triton's bundled copy)")


def sass_instruction_counts(object_file: str | Path, mnemonic: str) -> dict[tuple[str, str], int]:
    """``{(arch, kernel): number of instructions starting with mnemonic}`` in an object's SASS."""
    out = subprocess.run([str(cuobjdump()), "-sass", str(object_file)], capture_output=True, text=True, check=True).stdout
    counts: dict[tuple[str, str], int] = {}
    arch = kernel = ""
    for line in out.splitlines():
        stripped = line.strip()
        if stripped.startswith("arch = "):
            arch = stripped.split("=", 1)[1].strip()
        elif stripped.startswith("Function : "):
            kernel = stripped.split(":", 1)[1].strip()
            counts.setdefault((arch, kernel), 0)
        elif "*/" in stripped and kernel:
            instruction = stripped.split("*/", 1)[1].strip()
            if instruction.startswith(mnemonic):
                counts[(arch, kernel)] += 1
    return counts


if __name__ == "__main__":
    for (arch, kernel), count in sorted(sass_instruction_counts(sys.argv[1], sys.argv[2]).items()):
        print(f"{arch} {count:5d} {kernel}")
