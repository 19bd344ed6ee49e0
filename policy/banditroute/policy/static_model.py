"""Static (model2vec) embedding models distilled from a local sentence-transformer, built once and cached.

A static model is one vector per token of the source model's vocabulary
(model2vec: each token run through the transformer alone, PCA, SIF
weighting), so embedding a prompt is a tokenizer call and a mean of looked-up
rows: ~100x faster than the MiniLM forward on CPU, at nearly the same routing
quality (docs/results.md, "Static encoder").

Distillation takes ~15 s on 2 cores and downloads nothing (the source
weights are local). The result is cached under
``<cache_root>/<build key>/``; the key names everything the vectors depend
on: the source model's file hash, the distillation settings, and the
model2vec minor version. A build is written into a private temporary folder
and renamed into place, so two processes building at once never leave a
half-written model: the first rename wins and the other's copy is dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version as package_version
from pathlib import Path

log = logging.getLogger(__name__)

SIF_COEFFICIENT = 1e-4
"""model2vec's default token weighting (smooth inverse frequency); 0 switches the weighting off."""
QUANTIZE_TO = "float16"
"""Storage type of the token vectors (model2vec's default; 15 MB for MiniLM at 256 dims)."""
STORAGE_DTYPES = ("float16", "float32")
"""Storage types a static model may be distilled to (both are averaged in float32)."""
_SOURCE_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")
"""Top-level files of a source model that distillation can read (weights, config, tokenizer)."""
_BUILD_INFO = "build.json"


@dataclass(frozen=True)
class StaticBuildSpec:
    """Everything a distilled static model's vectors depend on."""

    source_name: str
    """Short name of the source model (folder name, or all-MiniLM-L6-v2 for the bundled one)."""
    source_sha256: str
    """Hash of the source model's files (see ``source_fingerprint``)."""
    pca_dims: int
    """Output dimension (PCA of the token vectors; the source width keeps every dimension, centred and rotated)."""
    sif_coefficient: float = SIF_COEFFICIENT
    """SIF token weighting coefficient a: a token of Zipf frequency p is scaled by a / (a + p); 0 = no weighting."""
    quantize_to: str = QUANTIZE_TO
    """Storage dtype of the vectors (one of STORAGE_DTYPES)."""
    model2vec_version: str = ""
    """major.minor of the model2vec that distills (its algorithm may change between minors)."""

    @property
    def key(self) -> str:
        """Folder name and encoder-id stem: readable, and unique per spec."""
        return (
            f"static-{self.source_name}@{self.source_sha256[:12]}-m2v{self.model2vec_version}"
            f"-pca{self.pca_dims}-sif{self.sif_coefficient:g}-{self.quantize_to}"
        )


def model2vec_minor_version() -> str:
    major, minor, *_ = package_version("model2vec").split(".")
    return f"{major}.{minor}"


def source_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the names and contents of the source model's top-level weight/config/tokenizer files."""
    folder = Path(model_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no model files ({', '.join(_SOURCE_SUFFIXES)})")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(folder.resolve()), stamp)


@functools.lru_cache(maxsize=8)
def _fingerprint(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    # Keyed by (path, sizes, mtimes): the ~90 MB of weights are hashed once per process.
    outer = hashlib.sha256()
    for name, _, _ in stamp:
        inner = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{name}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def build_spec(
    source_dir: str | os.PathLike,
    source_name: str,
    pca_dims: int,
    sif_coefficient: float = SIF_COEFFICIENT,
    quantize_to: str = QUANTIZE_TO,
) -> StaticBuildSpec:
    if not 0 <= sif_coefficient < 1:
        raise ValueError(f"static sif_coefficient must be in [0, 1), got {sif_coefficient}")
    if quantize_to not in STORAGE_DTYPES:
        raise ValueError(f"static dtype {quantize_to!r}: expected one of {STORAGE_DTYPES}")
    return StaticBuildSpec(
        source_name=source_name,
        source_sha256=source_fingerprint(source_dir),
        pca_dims=int(pca_dims),
        sif_coefficient=float(sif_coefficient),
        quantize_to=quantize_to,
        model2vec_version=model2vec_minor_version(),
    )


def publish_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Make ``final`` by running ``build(tmp)`` into a fresh private folder, then renaming it into place.

    Returns ``final``. If ``final`` already exists (now, or because another
    process renamed its build first), this build is discarded and the
    existing folder is kept: a directory rename onto a non-empty directory
    fails atomically on POSIX, so readers only ever see a complete folder.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("static model %s was built concurrently by another process; using theirs", final.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def distill_into(folder: Path, source_dir: str | os.PathLike, spec: StaticBuildSpec) -> None:
    """Distill ``source_dir`` with ``spec``'s settings and save the static model in ``folder``."""
    from model2vec.distill import distill_from_model
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the source is local; never reach a hub
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(source_dir), local_files_only=True)
    if spec.pca_dims > int(model.config.hidden_size):
        raise ValueError(f"static pca_dims {spec.pca_dims} exceeds the source width {model.config.hidden_size}")
    # CPU always: the same spec should give the same vectors on GPU and CPU machines.
    static = distill_from_model(
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        pca_dims=spec.pca_dims,
        sif_coefficient=spec.sif_coefficient or None,  # model2vec spells "no weighting" None
        quantize_to=spec.quantize_to,
    )
    static.save_pretrained(folder)
    (folder / _BUILD_INFO).write_text(json.dumps({**asdict(spec), "key": spec.key}, indent=2) + "\n")


def ensure_static_model(
    source_dir: str | os.PathLike,
    source_name: str,
    cache_root: str | os.PathLike,
    pca_dims: int,
    sif_coefficient: float = SIF_COEFFICIENT,
    quantize_to: str = QUANTIZE_TO,
) -> tuple[Path, StaticBuildSpec]:
    """(folder of the static model, its spec): distilled on first use, then read from the cache."""
    spec = build_spec(source_dir, source_name, pca_dims, sif_coefficient, quantize_to)
    final = Path(cache_root).expanduser() / spec.key
    if not final.is_dir():
        log.warning("building static encoder %s from %s (once; ~15 s on 2 cores)", spec.key, source_dir)
        publish_atomically(final, lambda tmp: distill_into(tmp, source_dir, spec))
    return final, spec


def load_static_model(folder: Path):
    """The model2vec StaticModel saved in ``folder`` (plain token table: no vocabulary quantization)."""
    from model2vec import StaticModel

    model = StaticModel.from_pretrained(folder, force_download=False)
    if model.weights is not None or model.token_mapping is not None:
        raise ValueError(f"{folder}: vocabulary-quantized static models are not supported")
    return model
