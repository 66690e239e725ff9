"""Who is signing in: the client the password throttle counts failures against.

The peer of the connection, unless that peer is a reverse proxy listed in
``WORKBENCH_TRUSTED_PROXIES``: only then is ``X-Forwarded-For`` believed (docs/UI.md).
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

from workbench.auth import CLIENT_SAFE, AuthConfigError


def _ip_or_none(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


ENV_TRUSTED_PROXIES = "WORKBENCH_TRUSTED_PROXIES"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def parse_trusted_proxies(raw: str | None) -> tuple[Network, ...]:
    """The proxies whose ``X-Forwarded-For`` is believed: comma-separated addresses or CIDR networks."""
    nets: list[Network] = []
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item))
        except ValueError as exc:
            hint = f" ({exc})" if "host bits" in str(exc) else ""
            raise AuthConfigError(
                f"{ENV_TRUSTED_PROXIES} lists {item!r}, which is not an IP address or a network such as "
                f"10.0.0.0/8{hint}. Give the addresses of your reverse proxies, separated by commas.") from None
    return tuple(nets)


def trusted_proxies(env: Mapping[str, str] | None = None) -> tuple[Network, ...]:
    """``WORKBENCH_TRUSTED_PROXIES`` parsed; none by default. Raises AuthConfigError for a bad value."""
    return parse_trusted_proxies((os.environ if env is None else env).get(ENV_TRUSTED_PROXIES))


def forwarded_allow_ips(trusted: tuple[Network, ...]) -> str:
    """uvicorn's ``FORWARDED_ALLOW_IPS`` for the same proxies ('' trusts none; its default trusts 127.0.0.1)."""
    return ",".join(str(net) for net in trusted)


def _is_trusted(ip: str | None, trusted: tuple[Network, ...]) -> bool:
    """``ip`` None is a loopback peer (Streamlit does not say which loopback address)."""
    addresses = _LOOPBACK if ip is None else (ipaddress.ip_address(ip),)
    return any(a in net for a in addresses for net in trusted)


def client_key(remote_ip: str | None, headers: Mapping[str, str] | None, session_key: str,
               trusted: tuple[Network, ...] = ()) -> str:
    """The key failures are counted under.

    ``remote_ip`` is the peer Streamlit saw (``st.context.ip_address``: None when it is
    loopback). X-Forwarded-For counts only when that peer is one of the ``trusted``
    proxies (WORKBENCH_TRUSTED_PROXIES), and then its right-most entry that is not itself
    a trusted proxy: the entries to its left are whatever the client sent. Any other
    peer, loopback included, is keyed by its own address, so rotating the header changes
    nothing. Without a connection at all (AppTest) the browser session is the client.
    """
    if remote_ip is None and not headers:
        return f"session:{CLIENT_SAFE.sub('', session_key)[:64]}"
    ip = _ip_or_none(remote_ip)
    if remote_ip is not None and ip is None:
        return "unknown"  # not an address: only a broken proxy in front sends this
    if not _is_trusted(ip, trusted):
        return ip or "local"
    entries = [e.strip() for e in ((headers or {}).get("X-Forwarded-For") or "").split(",") if e.strip()]
    for entry in reversed(entries):
        hop = _ip_or_none(entry)
        if hop is None:
            return "unknown"  # the proxy's own entry is never garbage: it is a broken chain
        if not _is_trusted(hop, trusted):
            return hop
    # Every hop is a trusted proxy: the left-most one is where the request started.
    if entries:
        return _ip_or_none(entries[0]) or "unknown"
    return ip or "local"
