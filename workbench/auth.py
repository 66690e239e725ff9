"""Optional password gate for the web UI.

Set ``WORKBENCH_PASSWORD_HASH`` to a string made by :func:`hash_password` and the app
asks for that password before any page runs. Make one with::

    python -m workbench.auth            # prompts twice, prints the hash
    python -c "from workbench.auth import hash_password; print(hash_password('s3cret'))"

Format: ``pbkdf2_sha256$<iterations>$<salt>$<hex digest>`` (stdlib only, constant-time
comparison). Without the variable the app is open — bind it to 127.0.0.1 (``make run``).
"""
from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import secrets
import sys

ENV_VAR = "WORKBENCH_PASSWORD_HASH"
ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000
MIN_ITERATIONS = 1_000


class PasswordHashError(ValueError):
    """The configured hash is malformed; ``str(err)`` is a user-facing message."""


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: str | None = None) -> str:
    if not password:
        raise ValueError("password must not be empty")
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"iterations must be at least {MIN_ITERATIONS}")
    salt = salt or secrets.token_hex(16)
    if "$" in salt:
        raise ValueError("salt must not contain '$'")
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("utf-8"), iterations)
    return f"{ALGORITHM}${iterations}${salt}${digest.hex()}"


def parse_hash(encoded: str) -> tuple[int, str, bytes]:
    """(iterations, salt, digest) of an encoded hash, or PasswordHashError."""
    parts = encoded.strip().split("$")
    if len(parts) != 4 or parts[0] != ALGORITHM:
        raise PasswordHashError(
            f"{ENV_VAR} must look like '{ALGORITHM}$<iterations>$<salt>$<hexdigest>' "
            "(make one with: python -m workbench.auth)."
        )
    _, iters, salt, hexdigest = parts
    try:
        iterations = int(iters)
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        raise PasswordHashError(f"{ENV_VAR} has a non-numeric iteration count or a non-hex digest.") from None
    if iterations < MIN_ITERATIONS or not salt or len(digest) != 32:
        raise PasswordHashError(f"{ENV_VAR} has too few iterations, an empty salt or a digest of the wrong length.")
    return iterations, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded``; raises PasswordHashError for a malformed hash."""
    iterations, salt, expected = parse_hash(encoded)
    got = hashlib.pbkdf2_hmac("sha256", (password or "").encode("utf-8"), salt.encode("utf-8"), iterations)
    return hmac.compare_digest(got, expected)


def configured_hash() -> str | None:
    """The password hash from the environment, or None when the app is open."""
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        password = argv[0]
    else:
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            print("Passwords differ.", file=sys.stderr)
            return 1
    if not password:
        print("Empty password.", file=sys.stderr)
        return 1
    print(hash_password(password))
    print(f"# export {ENV_VAR}='<the line above>'", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
