"""Where a job's LoRA file comes from: the server's LoRA folder, an http(s) URL or a Hugging Face file.

URLs (and Hugging Face files, fetched as `https://huggingface.co/<repo>/resolve/main/<file>`) go through the
caller's downloader — the server's guarded one, with the same host rules, size limit and deadline as every other
input — into a disk cache named by the URL's hash and bounded in total size (least recently used files go first).
No torch here: the API process may import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

from vace_local.core.errors import InputError
from vace_local.core.spec import LoraRef

#: (url, dest, field) → the downloaded file (at `dest`); raises InputError naming `field`.
Download = Callable[[str, Path, str], Path]
HF_BASE = "https://huggingface.co"
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_url(path: str, weight_name: str | None) -> str | None:
    """The download URL of a Hugging Face `owner/repo/file.safetensors` (or `owner/repo` + weight_name)."""
    parts = path.strip("/").split("/")
    if len(parts) < 2 or not _HF_REPO.match("/".join(parts[:2])) or any(p in ("", ".", "..") for p in parts):
        return None
    repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or weight_name
    if not file or ".." in file.split("/"):
        return None
    return f"{HF_BASE}/{repo}/resolve/main/{file.lstrip('/')}"


def check_safetensors(path: Path, field: str) -> None:
    """A cheap header check, so a HTML error page or a pickle is refused naming the field before any load."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= 100 * 1024 * 1024:
                raise ValueError
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, struct.error, UnicodeDecodeError):
        raise InputError(field, "not a .safetensors file (LoRAs must be safetensors; pickles are refused)") from None


class LoraFiles:
    """Resolves `LoraRef.path` to a local `.safetensors` file (see the module doc)."""

    def __init__(self, cache_dir: Path, download: Download, *, lora_dir: Path | None = None,
                 cache_bytes: int = 8 << 30, allow_local_paths: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.download = download
        self.lora_dir = Path(lora_dir).resolve() if lora_dir else None
        self.cache_bytes = cache_bytes
        #: The CLI takes the user's own local paths; the server never does (only its LoRA folder).
        self.allow_local_paths = allow_local_paths

    def resolve(self, ref: LoraRef, field: str) -> Path:
        path = ref.path.strip()
        if re.match(r"^https?://", path, re.I):
            return self._cached(path, field)
        if self.lora_dir is not None:
            for name in (path, f"{path}.safetensors"):
                p = (self.lora_dir / name).resolve()
                if p.is_relative_to(self.lora_dir) and p.is_file():
                    check_safetensors(p, field)
                    return p
        if self.allow_local_paths:
            p = Path(path.removeprefix("file://")).expanduser()
            if p.is_file():
                check_safetensors(p, field)
                return p
        url = hf_url(path, ref.weight_name)
        if url is None:
            where = f"no file named {path!r} in the LoRA folder" if self.lora_dir else "no LoRA folder is set " \
                "(VACE_LORA_DIR)"
            raise InputError(field, f"{where}, and it is not an http(s) URL or a Hugging Face "
                                    "owner/repo/file.safetensors (or owner/repo with weight_name)")
        return self._cached(url, field)

    def _cached(self, url: str, field: str) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        dest = self.cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.safetensors"
        if dest.is_file():
            os.utime(dest)  # recently used
            return dest
        tmp = dest.with_suffix(f".part{os.getpid()}")
        try:
            got = self.download(url, tmp, field)
            check_safetensors(got, field)
            got.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=dest)
        return dest

    def _evict(self, keep: Path) -> None:
        files = sorted((p for p in self.cache_dir.glob("*.safetensors") if p != keep),
                       key=lambda p: p.stat().st_mtime)
        total = keep.stat().st_size + sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.cache_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
