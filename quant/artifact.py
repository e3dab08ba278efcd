"""Artifact accounting: code bytes + compressed model bytes must be <= 16,000,000 (decimal bytes,
SPEC.md section 1), and the size lines every log ends with (SPEC.md section 4)."""
from __future__ import annotations

ARTIFACT_CAP = 16_000_000


class ArtifactTooLarge(ValueError):
    """The submission (code + model) is over the cap."""


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"artifact: {name} must be a non-negative int number of bytes, got {value!r}")
    return value


def check_artifact(code_bytes: int, model_bytes: int, cap: int = ARTIFACT_CAP) -> int:
    """Total submission bytes; raises ArtifactTooLarge saying by how much the cap is exceeded."""
    total = _count("code_bytes", code_bytes) + _count("model_bytes", model_bytes)
    if total > cap:
        raise ArtifactTooLarge(
            f"artifact is {total} bytes (code {code_bytes} + model {model_bytes}), "
            f"{total - cap} bytes over the {cap}-byte cap"
        )
    return total


def size_log_lines(code_bytes: int, model_bytes: int, label: str = "int8+zlib") -> list[str]:
    """`Serialized model ...`, `Code size ...`, `Total submission size ...`; `label` names the
    export scheme (empty for none), as public logs write e.g. `Serialized model int8+zlib: N bytes`."""
    code_bytes, model_bytes = _count("code_bytes", code_bytes), _count("model_bytes", model_bytes)
    tag = f" {label}" if label else ""
    return [
        f"Serialized model{tag}: {model_bytes} bytes",
        f"Code size: {code_bytes} bytes",
        f"Total submission size{tag}: {code_bytes + model_bytes} bytes",
    ]
