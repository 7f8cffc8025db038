"""The [link] table (encrypt = "wireguard"): every address of the link inside the tunnel, keys
checked, mistakes named by file and key (unit tier)."""

import pytest

from dmrepl.config import ConfigError, parse
from dmrepl.config.tunnel import Tunnel
from dmrepl.link import x25519

PEER_KEY = x25519.encode(x25519.public(bytes(range(32))))

LINK = f'''
[link]
encrypt = "wireguard"
private_key_file = "/etc/dmrepl/vm1.wg"
peer_public_key = "{PEER_KEY}"
address = "10.99.0.1"
peer_address = "10.99.0.2"
peer_endpoint = "192.0.2.2"
'''

PRIMARY = '''
name = "vm1"
[primary]
disk = "/srv/vm1/disk.img"
era_metadata = "/srv/vm1/era.img"
key_file = "/etc/dmrepl/vm1.key"
[[primary.secondaries]]
nbd = "10.99.0.2:10809"
link = "10.99.0.2:10810"
''' + LINK

SECONDARY = '''
name = "vm1"
[secondary]
disk = "/srv/vm1/disk.img"
hidden_stores = ["/srv/vm1/h0.img", "/srv/vm1/h1.img"]
listen = "10.99.0.1:10809"
key_file = "/etc/dmrepl/vm1.key"
''' + LINK


def test_a_tunnel_for_both_roles():
    pri = parse(PRIMARY, source="vm1.toml")
    assert pri.tunnel == Tunnel(interface="dmrepl-vm1", private_key_file="/etc/dmrepl/vm1.wg",
                                peer_public_key=PEER_KEY, address="10.99.0.1", peer_address="10.99.0.2",
                                listen_port=51820, peer_endpoint=("192.0.2.2", 51820))
    sec = parse(SECONDARY, source="vm1.toml")
    assert (sec.tunnel.address, sec.link_host, sec.link_port) == ("10.99.0.1", "10.99.0.1", 10810)
    more = SECONDARY.replace('peer_endpoint = "192.0.2.2"', 'peer_endpoint = "192.0.2.2:4000"\n'
                             'listen_port = 4001\ninterface = "wg-rep"')
    t = parse(more, source="vm1.toml").tunnel
    assert (t.peer_endpoint, t.listen_port, t.interface) == (("192.0.2.2", 4000), 4001, "wg-rep")


def test_no_table_or_none_is_a_plain_link():
    plain = PRIMARY.split("[link]")[0]
    assert parse(plain, source="vm1.toml").tunnel is None
    assert parse(plain + '[link]\nencrypt = "none"\n', source="vm1.toml").tunnel is None


@pytest.mark.parametrize("text,change,message", [
    (PRIMARY, ('nbd = "10.99.0.2:10809"', 'nbd = "192.0.2.2:10809"'),
     "'nbd' 192.0.2.2 is outside the WireGuard tunnel of [link]: use 10.99.0.2"),
    (PRIMARY, ('link = "10.99.0.2:10810"', 'link = "10.99.0.1:10810"'), "'link' 10.99.0.1 is outside"),
    (SECONDARY, ('listen = "10.99.0.1:10809"', 'listen = "0.0.0.0:10809"'), "'listen' 0.0.0.0 is outside"),
    (SECONDARY, ('\nkey_file', '\nlink_listen = "192.0.2.1:10810"\nkey_file'),
     "'link_listen' 192.0.2.1 is outside"),
    (PRIMARY, ('encrypt = "wireguard"', 'encrypt = "tls"'), "'encrypt' must be \"none\" or \"wireguard\""),
    (PRIMARY, ('encrypt = "wireguard"', 'encrypt = "none"'), "peer_public_key, private_key_file only with"),
    (PRIMARY, (PEER_KEY, "not base64!"), "'peer_public_key': not a base64 WireGuard key"),
    (PRIMARY, (PEER_KEY, "AAAA"), "'peer_public_key': a WireGuard key is 32 bytes, this one 3"),
    (PRIMARY, ('address = "10.99.0.1"', 'address = "10.99.0.1/24"'), "'address' '10.99.0.1/24' is not an IP"),
    (PRIMARY, ('address = "10.99.0.1"', 'address = "10.99.0.2"'), "'address' and 'peer_address' are both"),
    (PRIMARY, ('address = "10.99.0.1"', 'address = "fd00::1"'), "must both be IPv4 or both IPv6"),
    (PRIMARY, ('peer_endpoint = "192.0.2.2"', 'peer_endpoint = "10.99.0.2"'), "is inside the tunnel"),
    (PRIMARY, ('peer_endpoint = "192.0.2.2"', 'peer_endpoint = "peer.example"'), "peer_endpoint address"),
    (PRIMARY, ('private_key_file = "/etc/dmrepl/vm1.wg"\n', ''), "missing required key 'private_key_file'"),
    (PRIMARY, ('encrypt', 'listen_prt = 1\nencrypt'), "unknown key 'listen_prt'"),
    (PRIMARY, ('encrypt', 'listen_port = 0\nencrypt'), "'listen_port' must be from 1 to 65535"),
    (PRIMARY, ('encrypt', 'interface = "much-too-long-name"\nencrypt'), "is not a network interface name"),
    (PRIMARY.replace('name = "vm1"', 'name = "a-resource-name"'), ('', ''),
     "'dmrepl-a-resource-name' is not a network interface name: set link.interface"),
])
def test_bad_link_tables(text, change, message):
    with pytest.raises(ConfigError) as e:
        parse(text.replace(*change) if change[0] else text, source="/etc/dmrepl/vm1.toml")
    assert message in str(e.value) and str(e.value).startswith("/etc/dmrepl/vm1.toml [")
