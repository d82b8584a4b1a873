"""``from_pretrained`` of a teacher part with a damaged weight file named (the libraries' own errors,
e.g. safetensors' "Error while deserializing header: incomplete metadata", name no file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidscale.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def unreadable_weight_files(folder: Path) -> list[str]:
    """The weight files of ``folder`` whose header cannot be read (safetensors) or that are empty."""
    bad = []
    for f in sorted(Path(folder).glob("*")):
        if not f.is_file() or not f.name.endswith(WEIGHT_SUFFIXES):
            continue
        size = f.stat().st_size
        if size == 0:
            bad.append(f"{f} (empty)")
            continue
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            except Exception as e:  # noqa: BLE001 - any failure to read the header: named below
                bad.append(f"{f} ({size} bytes: {e})")
    return bad


def load_pretrained(cls: Any, folder: Path, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, **kwargs)``; a failure names the damaged file(s) of ``folder``."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised as it is unless a damaged file explains it
        if isinstance(e, ConfigError):
            raise
        bad = unreadable_weight_files(folder)
        if not bad:
            raise
        raise ConfigError(f"{folder}: {cls.__name__} could not be loaded ({type(e).__name__}: {e}): damaged weight "
                          f"file(s) {'; '.join(bad)} (truncated by an interrupted copy or download?); restore them "
                          "from the model's source") from e
