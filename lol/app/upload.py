"""Uploads on the page: the file types the uploader takes, the server's size limit and its caption. Reading and
judging the files is `lol.uploads`."""
from __future__ import annotations

from ..uploads import MAX_FILES, PICKLE_SUFFIXES, default_max_mb

__all__ = ["ACCEPTED_TYPES", "max_upload_mb", "limits_caption"]

ACCEPTED_TYPES = ["safetensors", "json"] + [s[1:] for s in PICKLE_SUFFIXES]  # pickles only to explain why not


def max_upload_mb() -> int:
    """The largest file the page reads: ``LOL_UPLOAD_MAX_MB``, else streamlit's ``server.maxUploadSize``."""
    import os

    import streamlit as st

    return default_max_mb() if os.environ.get("LOL_UPLOAD_MAX_MB", "").strip().isdigit() else \
        int(st.get_option("server.maxUploadSize"))


def limits_caption() -> str:
    mb = max_upload_mb()
    size = f"{mb / 1024:g} GB" if mb >= 1024 else f"{mb} MB"
    return (f"Up to {size} per file, {MAX_FILES} files at once. Read: .safetensors LoRAs (diffusers, kohya, PEFT); a "
            f"PEFT adapter as adapter_model.safetensors + adapter_config.json. Pickled .bin / .pt / .ckpt files are "
            f"not read: unpickling an uploaded file can run code (convert them to .safetensors first). The files are "
            f"deleted from the server as soon as they are read.")
