"""CNI error codes (SPEC section 5, "Error") and the exception that carries them."""

from __future__ import annotations

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
INTERNAL = 999

MESSAGES = {
    INCOMPATIBLE_VERSION: "incompatible CNI versions",
    UNSUPPORTED_FIELD: "unsupported field in network configuration",
    UNKNOWN_CONTAINER: "container unknown or does not exist",
    INVALID_ENV: "invalid environment variables",
    IO_FAILURE: "I/O failure",
    DECODE: "failed to decode content",
    INVALID_CONFIG: "invalid network config",
    TRY_AGAIN: "try again later",
    NOT_AVAILABLE: "plugin not available",
    LIMITED_CONNECTIVITY: "plugin not available, existing containers may have limited connectivity",
    INTERNAL: "internal error",
}


class CniError(Exception):
    """A failure reported to the runtime as CNI error JSON."""

    def __init__(self, code: int, details: str, msg: str | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.msg = msg or MESSAGES.get(code, "error")
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, object]:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg
