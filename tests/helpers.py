"""Helpers shared by several test modules (pytest puts this folder on sys.path)."""

import hashlib
import json
from pathlib import Path

from charlm.checkpoint import CHECKSUMS_FILE


def rewrite_checksums(folder: Path) -> None:
    """Re-sign a deliberately edited checkpoint, as a careless or hostile author would, so the check under
    test is not the checksum's."""
    manifest = json.loads((folder / CHECKSUMS_FILE).read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(manifest))
