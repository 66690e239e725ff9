"""The sign-in gate: throttling, lockout and the audit log (pure Python, injected clock),
then the page itself through AppTest, and the deep link through a real browser."""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from builders import free_port, stop, wait_for_200
from conftest import REPO_ROOT
from streamlit.testing.v1 import AppTest

from workbench import auth, client_address
from workbench.client_address import client_key, parse_trusted_proxies

APP = REPO_ROOT / "workbench" / "app.py"
RIGHT, WRONG = "open sesame", "guess"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def encoded() -> str:
    return auth.hash_password(RIGHT, iterations=1000)


def make_gate(tmp_path: Path, clock: FakeClock, policy: auth.ThrottlePolicy | None = None) -> auth.PasswordGate:
    return auth.PasswordGate(throttle=auth.LoginThrottle(policy or auth.ThrottlePolicy(), clock=clock),
                             log_path=lambda: tmp_path / "logs" / "auth.log", wall_clock=clock)


def log_lines(tmp_path: Path) -> list[str]:
    return (tmp_path / "logs" / "auth.log").read_text().splitlines()


def test_policy_backs_off_then_locks_out() -> None:
    p = auth.ThrottlePolicy()
    assert [p.delay_after(n) for n in range(0, 12)] == [0, 1, 2, 4, 8, 16, 32, 60, 60, 60, 900, 900]


def test_policy_from_env() -> None:
    env = {auth.ENV_MAX_FAILURES: "5", auth.ENV_LOCKOUT_SECONDS: "60", auth.ENV_BACKOFF_SECONDS: "2",
           auth.ENV_BACKOFF_MAX_SECONDS: "10"}
    p = auth.ThrottlePolicy.from_env(env)
    assert (p.max_failures, p.lockout_s, p.backoff_s, p.backoff_max_s) == (5, 60, 2, 10)
    assert auth.ThrottlePolicy.from_env({}) == auth.ThrottlePolicy()
    with pytest.raises(auth.AuthConfigError, match=auth.ENV_MAX_FAILURES):
        auth.ThrottlePolicy.from_env({auth.ENV_MAX_FAILURES: "ten"})
    with pytest.raises(auth.AuthConfigError):
        auth.ThrottlePolicy.from_env({auth.ENV_LOCKOUT_SECONDS: "-1"})


def test_hundred_wrong_passwords_take_hours_and_are_logged(tmp_path: Path, encoded: str) -> None:
    """A patient attacker who waits exactly as long as told: 100 guesses take far more than minutes."""
    clock = FakeClock()
    gate = make_gate(tmp_path, clock)
    start = clock.now
    for _ in range(100):
        clock.advance(gate.throttle.check("203.0.113.7").wait_s)
        result = gate.attempt("203.0.113.7", WRONG, encoded)
        assert result.checked and not result.ok
    elapsed = clock.now - start
    assert elapsed >= 60 * 60  # 243 s of backoff, then 15 minutes per guess: about 22 hours
    lines = log_lines(tmp_path)
    assert len(lines) == 100 and all(" failure client=203.0.113.7 " in ln for ln in lines)
    assert " locked" in lines[-1] and "failures=100" in lines[-1]
    assert WRONG not in (tmp_path / "logs" / "auth.log").read_text()


def test_hammering_is_refused_without_checking(tmp_path: Path, encoded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 guesses in 12.5 seconds: only the first few are even compared, every one is logged."""
    calls: list[str] = []
    real_verify = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda pw, enc: calls.append(pw) or real_verify(pw, enc))
    clock = FakeClock()
    gate = make_gate(tmp_path, clock)
    results = []
    for _ in range(100):
        results.append(gate.attempt("198.51.100.2", WRONG, encoded))
        clock.advance(0.125)  # exact in binary: tries land on t = 1, 3, 7 s
    assert len(calls) == sum(r.checked for r in results) == 4  # at t=0, 1, 3, 7 s
    refused = [r for r in results if not r.checked]
    assert refused and all(not r.after.allowed and r.after.wait_s > 0 for r in refused)
    lines = log_lines(tmp_path)
    assert len(lines) == 100 and sum(" refused " in ln for ln in lines) == 96
    # Even the right password is not looked at while the client must wait.
    assert gate.attempt("198.51.100.2", RIGHT, encoded).checked is False
    # Another client is not affected.
    assert gate.attempt("198.51.100.3", RIGHT, encoded).ok


def test_right_password_after_waiting_resets_the_count(tmp_path: Path, encoded: str) -> None:
    clock = FakeClock()
    gate = make_gate(tmp_path, clock, auth.ThrottlePolicy(max_failures=3, lockout_s=600))
    for _ in range(3):
        clock.advance(gate.throttle.check("c").wait_s)
        gate.attempt("c", WRONG, encoded)
    state = gate.throttle.check("c")
    assert state.locked and state.wait_s == 600
    assert auth.wait_message(state) == ("Too many wrong passwords from your address: sign-in is locked. "
                                        "Try again in 10 minutes.")
    clock.advance(600)
    assert gate.attempt("c", RIGHT, encoded).ok
    assert gate.throttle.check("c") == auth.ThrottleState(0, 0.0, False)
    assert log_lines(tmp_path)[-1].split()[1:3] == ["success", "client=c"]


def test_parallel_attempts_from_one_client_get_one_try(encoded: str) -> None:
    throttle = auth.LoginThrottle(auth.ThrottlePolicy(backoff_s=30))
    allowed = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        allowed.append(throttle.begin("same").allowed)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(allowed) == [False] * 7 + [True]


def test_throttle_forgets_and_stays_bounded() -> None:
    clock = FakeClock()
    throttle = auth.LoginThrottle(auth.ThrottlePolicy(max_clients=3, forget_after_s=100), clock=clock)
    for i in range(5):
        throttle.begin(f"10.0.0.{i}")
        clock.advance(1)
    assert len(throttle._entries) == 3
    clock.advance(100)
    assert throttle.check("10.0.0.4").failures == 0


def test_describe_wait() -> None:
    assert [auth.describe_wait(s) for s in (0.2, 1, 2, 59.5, 61, 900)] == [
        "1 second", "1 second", "2 seconds", "60 seconds", "2 minutes", "15 minutes"]


def test_client_key_ignores_forwarded_for_from_unlisted_peers() -> None:
    xff = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}
    assert client_key("198.51.100.1", xff, "s") == "198.51.100.1"  # direct peer: header ignored
    assert client_key(None, xff, "s") == "local"  # a loopback peer is not a proxy unless listed
    assert client_key(None, {"X-Forwarded-For": "evil\nline"}, "s") == "local"
    assert client_key(None, {"Host": "x"}, "s") == "local"
    assert client_key(None, {}, "abc") == "session:abc"


def test_rotating_forwarded_for_from_a_local_peer_hits_one_lockout(tmp_path: Path) -> None:
    # The attack from issue 26: a process on the server's machine sends a new X-Forwarded-For
    # with every guess. Without WORKBENCH_TRUSTED_PROXIES every guess is the same client.
    clock = FakeClock()
    gate = make_gate(tmp_path, clock, auth.ThrottlePolicy(backoff_s=1, max_failures=3, lockout_s=900))
    checked = 0
    for i in range(30):
        client = client_key(None, {"X-Forwarded-For": f"198.51.{i}.7"}, "s")
        checked += gate.attempt(client, WRONG, auth.hash_password(RIGHT, iterations=1000)).checked
        clock.advance(2.5)  # the 75 s of the report
    assert checked == 3
    assert {ln.split()[2] for ln in log_lines(tmp_path)} == {"client=local"}


def test_client_key_from_a_listed_proxy_takes_the_first_untrusted_hop() -> None:
    trusted = parse_trusted_proxies(" 127.0.0.1, 10.0.0.0/8 ,")
    assert [str(n) for n in trusted] == ["127.0.0.1/32", "10.0.0.0/8"]
    chain = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9, 10.1.2.3"}  # client, its address, an inner proxy
    assert client_key(None, chain, "s", trusted) == "203.0.113.9"  # loopback proxy
    assert client_key("10.0.0.5", {"X-Forwarded-For": "203.0.113.9"}, "s", trusted) == "203.0.113.9"
    assert client_key("198.51.100.1", chain, "s", trusted) == "198.51.100.1"  # not listed: its own address
    assert client_key(None, {"Host": "x"}, "s", trusted) == "local"  # listed, no header
    assert client_key(None, {"X-Forwarded-For": "10.0.0.9, 10.0.0.8"}, "s", trusted) == "10.0.0.9"
    assert client_key(None, {"X-Forwarded-For": "1.2.3.4, evil"}, "s", trusted) == "unknown"
    assert client_key(None, {"X-Forwarded-For": "1.2.3.4"}, "s", parse_trusted_proxies("::1")) == "1.2.3.4"


def test_trusted_proxies_setting_is_checked() -> None:
    assert client_address.trusted_proxies({}) == () and client_address.forwarded_allow_ips(()) == ""
    assert client_address.forwarded_allow_ips(parse_trusted_proxies("10.0.0.0/8,::1")) == "10.0.0.0/8,::1/128"
    with pytest.raises(auth.AuthConfigError, match="WORKBENCH_TRUSTED_PROXIES lists 'proxy.local', which is not"):
        client_address.trusted_proxies({client_address.ENV_TRUSTED_PROXIES: "10.0.0.1, proxy.local"})
    with pytest.raises(auth.AuthConfigError, match=r"'10.0.0.1/8'.*has host bits set"):
        parse_trusted_proxies("10.0.0.1/8")


def test_ui_refuses_a_bad_trusted_proxies_setting(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from workbench.cli.ui import cmd_ui

    monkeypatch.setenv(client_address.ENV_TRUSTED_PROXIES, "nginx")
    assert cmd_ui(argparse.Namespace(host="127.0.0.1", port=1)) == 2
    assert "Not starting: WORKBENCH_TRUSTED_PROXIES lists 'nginx'" in capsys.readouterr().err


def test_uvicorn_rewrites_the_peer_only_for_listed_proxies() -> None:
    # Streamlit serves through uvicorn, whose ProxyHeadersMiddleware (on by default, trusting
    # 127.0.0.1) rewrites the peer Streamlit reports; `workbench ui` hands it our list instead.
    import asyncio

    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    def peer_seen(trusted: str, peer: str) -> str:
        seen: list[str] = []

        async def app(scope: dict, receive: object, send: object) -> None:
            seen.append(scope["client"][0])

        scope = {"type": "http", "client": (peer, 5000), "headers": [(b"x-forwarded-for", b"203.0.113.9")]}
        asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=trusted)(scope, None, None))  # type: ignore[arg-type]
        return seen[0]

    assert peer_seen(client_address.forwarded_allow_ips(()), "127.0.0.1") == "127.0.0.1"
    local_proxy = client_address.forwarded_allow_ips(parse_trusted_proxies("127.0.0.1"))
    assert peer_seen(local_proxy, "127.0.0.1") == "203.0.113.9"


def test_exposure_rule() -> None:
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("localhost") and auth.is_loopback("::1")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("") and not auth.is_loopback(None)
    assert auth.open_exposure_problem("127.0.0.1", {}) is None
    msg = auth.open_exposure_problem("0.0.0.0", {})
    assert msg and "without a password" in msg and auth.ENV_VAR in msg and auth.ENV_ALLOW_OPEN in msg
    assert auth.open_exposure_problem("0.0.0.0", {auth.ENV_VAR: "pbkdf2_sha256$..."}) is None
    assert auth.open_exposure_problem("0.0.0.0", {auth.ENV_ALLOW_OPEN: "1"}) is None
    assert auth.open_exposure_problem("0.0.0.0", {auth.ENV_ALLOW_OPEN: "0"}) is not None


def test_ui_hides_internal_routes() -> None:
    from workbench.cli.ui import is_hidden

    assert is_hidden("/_stcore/metrics") and is_hidden("/base/_stcore/metrics/")
    assert is_hidden("/_stcore/agent/openapi.json") and is_hidden("/_stcore/script-health-check")
    assert not is_hidden("/_stcore/health") and not is_hidden("/media/abc.png") and not is_hidden("/evaluate")


# --- the page ---------------------------------------------------------------------------

def test_login_page_throttles_and_logs(data_dir: Path, encoded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.ENV_VAR, encoded)
    monkeypatch.setenv(auth.ENV_BACKOFF_SECONDS, "30")  # long enough that the second try is surely early
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    at.text_input[0].set_value(WRONG)
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["Wrong password."]
    assert [w.value for w in at.warning] == [
        "Too many wrong passwords from your address. Wait 30 seconds before trying again."]
    # Second try right away, even with the right password: refused, not checked.
    at.text_input[0].set_value(RIGHT)
    at.button[0].click().run()
    assert not at.error and not at.metric
    assert "Wait 30 seconds" in at.warning[0].value or "Wait 29 seconds" in at.warning[0].value
    lines = (data_dir / "logs" / "auth.log").read_text().splitlines()
    assert [ln.split()[1] for ln in lines] == ["failure", "refused"]
    assert all("client=session:" in ln for ln in lines)
    assert WRONG not in "".join(lines) and RIGHT not in "".join(lines)


def test_open_and_exposed_app_warns_on_every_page(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit import config

    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    before = config.get_option("server.address")
    try:
        config.set_option("server.address", "0.0.0.0")
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.run()
        assert any("No password is set" in w.value for w in at.sidebar.warning)
        config.set_option("server.address", "127.0.0.1")
        at.run()
        assert not any("accepts connections from other machines" in w.value for w in at.sidebar.warning)
    finally:
        config.set_option("server.address", before)


# --- the deep link, in a real browser -----------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing")
def test_deep_link_survives_sign_in(tmp_path: Path, encoded: str) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "WORKBENCH_DATA_DIR": str(tmp_path / "data"), auth.ENV_VAR: encoded}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen([str(REPO_ROOT / ".venv" / "bin" / "workbench"), "ui", "--port", str(port)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for_200(f"{url}/_stcore/health", proc) == 200
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.set_default_timeout(90_000)
            page.goto(f"{url}/evaluate?run=3")
            field = page.get_by_label("Password", exact=True)
            field.fill(RIGHT)
            field.press("Enter")
            page.wait_for_function("() => [...document.querySelectorAll('h1')].some(h => h.innerText === 'Evaluate')")
            assert page.url == f"{url}/evaluate?run=3"
            browser.close()
        log = (tmp_path / "data" / "logs" / "auth.log").read_text()
        assert " success client=local " in log
    finally:
        stop(proc)
