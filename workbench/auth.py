"""Optional password gate for the web UI.

Set ``WORKBENCH_PASSWORD_HASH`` to a string made by :func:`hash_password` and the app
asks for that password before any page runs. Make one with::

    python -m workbench.auth            # prompts twice, prints the hash
    python -c "from workbench.auth import hash_password; print(hash_password('s3cret'))"

Format: ``pbkdf2_sha256$<iterations>$<salt>$<hex digest>`` (stdlib only, constant-time
comparison). Without the variable the app is open — bind it to 127.0.0.1 (``make run``);
``workbench ui`` refuses any other address without a password unless ``WORKBENCH_ALLOW_OPEN=1``.

Guessing is slowed per client (:mod:`workbench.client_address` says who that is) by
:class:`LoginThrottle` (exponential backoff, then a lockout) and every attempt is appended
to ``<data dir>/logs/auth.log`` by :class:`PasswordGate`. Both are plain Python (no Streamlit) with an injectable clock.
State is in-process: restarting the server forgets it.
"""
from __future__ import annotations

import getpass
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

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


# --- throttling -------------------------------------------------------------------------

ENV_MAX_FAILURES = "WORKBENCH_AUTH_MAX_FAILURES"
ENV_LOCKOUT_SECONDS = "WORKBENCH_AUTH_LOCKOUT_SECONDS"
ENV_BACKOFF_SECONDS = "WORKBENCH_AUTH_BACKOFF_SECONDS"
ENV_BACKOFF_MAX_SECONDS = "WORKBENCH_AUTH_BACKOFF_MAX_SECONDS"
ENV_ALLOW_OPEN = "WORKBENCH_ALLOW_OPEN"


# A client key may come from a header: logs keep it to address characters.
CLIENT_SAFE = re.compile(r"[^0-9A-Za-z.:_\-\[\]]")


class AuthConfigError(ValueError):
    """A throttle setting in the environment is not a valid number; ``str(err)`` is user-facing."""


@dataclass(frozen=True)
class ThrottlePolicy:
    """How long a client waits after failed sign-ins.

    After the n-th failure in a row (n < max_failures) the next try is allowed after
    ``min(backoff_s * 2**(n-1), backoff_max_s)``; from the ``max_failures``-th failure on,
    each failure locks the client out for ``lockout_s``. A right password, or
    ``forget_after_s`` without a failure, clears the count.
    """

    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    max_failures: int = 10
    lockout_s: float = 15 * 60.0
    forget_after_s: float = 24 * 3600.0
    max_clients: int = 10_000  # bounds memory if someone cycles through many addresses

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ThrottlePolicy:
        env = os.environ if env is None else env
        d = cls()

        def number(name: str, default: float, minimum: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise AuthConfigError(f"{name} must be a number, got {raw!r}.") from None
            if not math.isfinite(value) or value < minimum:
                raise AuthConfigError(f"{name} must be at least {minimum:g}, got {raw!r}.")
            return value

        return cls(
            backoff_s=number(ENV_BACKOFF_SECONDS, d.backoff_s, 0),
            backoff_max_s=number(ENV_BACKOFF_MAX_SECONDS, d.backoff_max_s, 0),
            max_failures=int(number(ENV_MAX_FAILURES, d.max_failures, 1)),
            lockout_s=number(ENV_LOCKOUT_SECONDS, d.lockout_s, 0),
        )

    def delay_after(self, failures: int) -> float:
        """Seconds a client must wait after its ``failures``-th failure in a row."""
        if failures <= 0:
            return 0.0
        if failures >= self.max_failures:
            return self.lockout_s
        return min(self.backoff_s * 2 ** (failures - 1), self.backoff_max_s)


@dataclass(frozen=True)
class ThrottleState:
    """Where a client stands: may it try now, and if not, for how long must it wait."""

    failures: int
    wait_s: float
    locked: bool

    @property
    def allowed(self) -> bool:
        return self.wait_s <= 0


@dataclass
class _Entry:
    failures: int = 0
    last_failure: float = 0.0


class LoginThrottle:
    """Failed sign-ins per client, in memory, safe to share between Streamlit's script threads."""

    def __init__(self, policy: ThrottlePolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _state(self, entry: _Entry | None, now: float) -> ThrottleState:
        if entry is None or entry.failures == 0:
            return ThrottleState(0, 0.0, False)
        wait = entry.last_failure + self.policy.delay_after(entry.failures) - now
        return ThrottleState(entry.failures, max(wait, 0.0), entry.failures >= self.policy.max_failures and wait > 0)

    def _entry(self, client: str, now: float) -> _Entry | None:
        entry = self._entries.get(client)
        if entry is not None and now - entry.last_failure >= self.policy.forget_after_s:
            del self._entries[client]
            return None
        return entry

    def check(self, client: str) -> ThrottleState:
        """The client's state now; changes nothing."""
        with self._lock:
            now = self._clock()
            return self._state(self._entry(client, now), now)

    def begin(self, client: str) -> ThrottleState:
        """Start an attempt: refused (``allowed`` False) while the client must wait.

        An allowed attempt is counted as a failure right away and cleared by
        :meth:`succeeded`, so parallel tries from one client cannot all slip through
        before the first one is recorded.
        """
        with self._lock:
            now = self._clock()
            entry = self._entry(client, now)
            state = self._state(entry, now)
            if not state.allowed:
                return state
            if entry is None:
                self._evict(now)
                entry = self._entries[client] = _Entry()
            entry.failures += 1
            entry.last_failure = now
            return ThrottleState(entry.failures - 1, 0.0, False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._entries.pop(client, None)

    def _evict(self, now: float) -> None:
        if len(self._entries) < self.policy.max_clients:
            return
        for key in [k for k, e in self._entries.items() if now - e.last_failure >= self.policy.forget_after_s]:
            del self._entries[key]
        while len(self._entries) >= self.policy.max_clients:  # still full: forget the oldest
            del self._entries[min(self._entries, key=lambda k: self._entries[k].last_failure)]


def describe_wait(seconds: float) -> str:
    """'1 second', '40 seconds', '3 minutes', rounded up so the user never comes back too early."""
    if seconds <= 60:
        n = max(1, math.ceil(seconds))
        return f"{n} second{'s' if n != 1 else ''}"
    n = math.ceil(seconds / 60)
    return f"{n} minute{'s' if n != 1 else ''}"


def wait_message(state: ThrottleState) -> str:
    """What the sign-in form says while a client has to wait."""
    if state.locked:
        return (f"Too many wrong passwords from your address: sign-in is locked. "
                f"Try again in {describe_wait(state.wait_s)}.")
    return f"Too many wrong passwords from your address. Wait {describe_wait(state.wait_s)} before trying again."


# --- the gate: throttle + check + log ----------------------------------------------------

def auth_log_path() -> Path:
    from workbench.settings import get_settings

    return get_settings().data_dir / "logs" / "auth.log"


@dataclass(frozen=True)
class Attempt:
    """Outcome of one sign-in try. ``checked`` is False when the throttle refused it unread."""

    ok: bool
    checked: bool
    after: ThrottleState


@dataclass
class PasswordGate:
    """Throttle, constant-time check and audit log, in that order. Never logs the password."""

    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    log_path: Callable[[], Path] = auth_log_path
    wall_clock: Callable[[], float] = time.time
    _log_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def attempt(self, client: str, password: str, encoded: str) -> Attempt:
        start = self.throttle.begin(client)
        if not start.allowed:
            self._log("refused", client, start)
            return Attempt(ok=False, checked=False, after=start)
        if verify_password(password, encoded):
            self.throttle.succeeded(client)
            after = ThrottleState(0, 0.0, False)
            self._log("success", client, after)
            return Attempt(ok=True, checked=True, after=after)
        after = self.throttle.check(client)
        self._log("failure", client, after)
        return Attempt(ok=False, checked=True, after=after)

    def _log(self, event: str, client: str, state: ThrottleState) -> None:
        when = datetime.fromtimestamp(self.wall_clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = (f"{when} {event} client={CLIENT_SAFE.sub('?', client)[:80]} failures={state.failures} "
                f"wait_s={math.ceil(state.wait_s)}{' locked' if state.locked else ''}\n")
        try:
            path = self.log_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._log_lock, open(path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:  # an unwritable log must not open or break the gate
            print(f"workbench: could not write the sign-in log ({exc}): {line}", end="", file=sys.stderr)


_default_lock = threading.Lock()
_default_gate: PasswordGate | None = None


def default_gate() -> PasswordGate:
    """The process-wide gate (one throttle shared by every session of this server).

    Rebuilt when the throttle settings in the environment change (tests); raises
    AuthConfigError for a malformed setting.
    """
    global _default_gate
    policy = ThrottlePolicy.from_env()
    with _default_lock:
        if _default_gate is None or _default_gate.throttle.policy != policy:
            _default_gate = PasswordGate(throttle=LoginThrottle(policy))
        return _default_gate


# --- exposure ---------------------------------------------------------------------------

def is_loopback(host: str | None) -> bool:
    """True if ``host`` only reaches this machine. None/'' means every interface (Streamlit's default)."""
    if not host:
        return False
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def open_exposure_problem(host: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """Why serving on ``host`` must be refused, or None when it is fine."""
    env = os.environ if env is None else env
    if is_loopback(host) or env.get(ENV_ALLOW_OPEN, "").strip() == "1":
        return None
    if env.get(ENV_VAR, "").strip():
        return None
    return (f"Refusing to serve Workbench on {host or 'every network interface'} without a password: anyone "
            f"who can reach this machine could use it. Set {ENV_VAR} (make one with: python -m workbench.auth), "
            f"or use --host 127.0.0.1, or set {ENV_ALLOW_OPEN}=1 if something in front of it already controls "
            "who gets in.")


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
