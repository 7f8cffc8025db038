"""The nbd generic netlink message class against include/uapi/linux/nbd-netlink.h (unit tier).

Attribute numbers are the uapi's enum positions: a message is encoded with
pyroute2 and its raw attributes are read back with struct, so a wrong order in
nla_map shows here, before any kernel sees it.
"""

import struct

from dmrepl.nbd.netlink import ClientFlag, Cmd, nbdmsg

# include/uapi/linux/nbd-netlink.h
UAPI_ATTRS = {"NBD_ATTR_INDEX": 1, "NBD_ATTR_SIZE_BYTES": 2, "NBD_ATTR_BLOCK_SIZE_BYTES": 3,
              "NBD_ATTR_TIMEOUT": 4, "NBD_ATTR_SERVER_FLAGS": 5, "NBD_ATTR_CLIENT_FLAGS": 6,
              "NBD_ATTR_SOCKETS": 7, "NBD_ATTR_DEAD_CONN_TIMEOUT": 8, "NBD_ATTR_DEVICE_LIST": 9,
              "NBD_ATTR_BACKEND_IDENTIFIER": 10}
NLA_F_NESTED = 1 << 15


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        out.append((kind & ~NLA_F_NESTED, data[off + 4:off + length]))
        off += (length + 3) & ~3
    return out


def test_attribute_numbers_follow_the_uapi():
    for name, number in UAPI_ATTRS.items():
        assert nbdmsg.nla_map[number][0] == name
    assert [c.value for c in Cmd] == [1, 2, 3, 4, 5]   # NBD_CMD_CONNECT .. NBD_CMD_STATUS
    assert ClientFlag.DESTROY_ON_DISCONNECT == 1 and ClientFlag.DISCONNECT_ON_CLOSE == 2


def test_connect_message_encodes_sizes_and_nested_sockets():
    msg = nbdmsg()
    msg["cmd"] = Cmd.CONNECT
    msg["version"] = 1
    msg["attrs"] = [("NBD_ATTR_SIZE_BYTES", 64 << 20), ("NBD_ATTR_TIMEOUT", 2),
                    ("NBD_ATTR_SOCKETS", {"attrs": [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", 7)]}),
                                                    ("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", 9)]})]})]
    msg.encode()
    data = bytes(msg.data)
    # nlmsghdr (16) + genlmsghdr (4), then the attributes
    assert data[16] == Cmd.CONNECT and data[17] == 1
    attrs = _attrs(data[20:])
    assert [k for k, _ in attrs] == [2, 4, 7]
    assert struct.unpack("=Q", attrs[0][1]) == (64 << 20,)
    assert struct.unpack("=Q", attrs[1][1]) == (2,)
    items = _attrs(attrs[2][1])
    assert [k for k, _ in items] == [1, 1]                       # NBD_SOCK_ITEM twice
    fds = [_attrs(v)[0] for _, v in items]
    assert [(k, struct.unpack("=I", v)[0]) for k, v in fds] == [(1, 7), (1, 9)]   # NBD_SOCK_FD
