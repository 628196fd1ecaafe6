"""The node's WireGuard key pair: generated on first start, kept in weftd's state directory.

The state directory is not a tmpfs (Flannel keeps its key in /run/flannel and so gets a new one
on every reboot, which every peer must learn before traffic flows again). The file holds the
private key in base64, as `wg genkey` writes it, with mode 0600. The private key is never logged
and never leaves this module except to be handed to the device.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from weftd.backend.errors import BackendError
from weftlib.kernel.files import write_atomic

KEY_FILE = "wireguard.key"


class KeyFileError(BackendError):
    """The key file exists but cannot be used, or the public key cannot be derived."""


@dataclass(frozen=True)
class KeyPair:
    private: bytes = field(repr=False)
    public: bytes

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        return cls(private, base64.b64decode(public_key(base64.b64encode(private).decode())))

    @classmethod
    def generate(cls) -> KeyPair:
        """A Curve25519 private key clamped as `wg genkey` clamps it."""
        key = bytearray(os.urandom(32))
        key[0] &= 248
        key[31] = (key[31] & 127) | 64
        return cls.from_private(bytes(key))


def public_key(private_b64: str) -> str:
    """The X25519 public key, from `wg pubkey` (wireguard-tools): one exec at start-up costs less than
    the ~9 MiB a Python X25519 binding adds to weftd for as long as it runs. The key goes through a pipe,
    never the command line."""
    wg = shutil.which("wg")
    if wg is None:
        raise KeyFileError("`wg` (Debian package wireguard-tools) is needed to derive the WireGuard public key")
    p = subprocess.run([wg, "pubkey"], input=private_b64 + "\n", capture_output=True, text=True, check=False,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout=10)
    out = p.stdout.strip()
    if p.returncode != 0 or len(out) != 44:
        raise KeyFileError(f"wg pubkey failed ({p.returncode}): {p.stderr.strip()[:200]}")
    return out


def load_or_create(path: Path) -> tuple[KeyPair, bool]:
    """The key pair stored at `path`, created (mode 0600, written atomically) if the file is missing.
    Returns the pair and whether it was created now."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        pair = KeyPair.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, base64.b64encode(pair.private) + b"\n", 0o600, fsync=True)
        return pair, True
    except OSError as e:
        raise KeyFileError(f"reading the WireGuard key {path}: {e.strerror}") from None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        # Never echo the content: it may be a key in another format.
        raise KeyFileError(f"{path} does not hold a WireGuard private key (32 bytes, base64); "
                        "delete it to have a new key generated")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)
    return KeyPair.from_private(raw), False
