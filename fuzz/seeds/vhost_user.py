#!/usr/bin/env python3
"""Seed inputs for the vhost_user_messages fuzz target: a frontend's
bring-up of one queue (as QEMU does it), in the target's chunk format
([kind][len lo][len hi][bytes], kind 0x80 attaches an eventfd, 0xFC a
64 KiB memfd). Usage: vhost_user.py OUT_DIR"""
import os
import struct
import sys

UADDR = 0x7F00_0000_0000


def msg(req, payload=b"", flags=0x1):
    return struct.pack("<III", req, flags, len(payload)) + payload


def chunk(data, kind=0):
    return bytes([kind]) + struct.pack("<H", len(data)) + data


EVENTFD, MEMFD = 0x80, 0xFC


def bring_up(features, protocol, extra=b""):
    state = lambda i, n: struct.pack("<II", i, n)
    out = chunk(msg(3))  # SET_OWNER
    out += chunk(msg(1))  # GET_FEATURES
    out += chunk(msg(2, struct.pack("<Q", features)))
    out += chunk(msg(15))  # GET_PROTOCOL_FEATURES
    out += chunk(msg(16, struct.pack("<Q", protocol)))
    region = struct.pack("<QQQQ", 0, 65536, UADDR, 0)
    out += chunk(msg(5, struct.pack("<II", 1, 0) + region), MEMFD)
    out += chunk(msg(8, state(0, 16)))  # SET_VRING_NUM
    out += chunk(msg(10, state(0, 0)))  # SET_VRING_BASE
    addr = struct.pack("<IIQQQQ", 0, 0, UADDR, UADDR + 0x2000, UADDR + 0x1000, 0)
    out += chunk(msg(9, addr))  # SET_VRING_ADDR
    out += chunk(msg(12, struct.pack("<Q", 0)), EVENTFD)  # SET_VRING_KICK
    out += chunk(msg(13, struct.pack("<Q", 0)), EVENTFD)  # SET_VRING_CALL
    out += chunk(msg(18, state(0, 1)))  # SET_VRING_ENABLE
    out += chunk(msg(24, struct.pack("<III", 0, 60, 0) + bytes(60)))  # GET_CONFIG
    out += extra
    out += chunk(msg(11, state(0, 0)))  # GET_VRING_BASE
    return out


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    version1, proto, event_idx = 1 << 32, 1 << 30, 1 << 29
    seeds = {
        "plain": bring_up(version1 | proto, 0x1 | 0x8 | 0x200),
        "event_idx": bring_up(version1 | proto | event_idx, 0x1 | 0x8 | 0x200 | 0x1000),
        # ADD_MEM_REG / REM_MEM_REG with the configure-mem-slots feature.
        "mem_slots": bring_up(
            version1 | proto,
            0x1 | 0x8 | 0x200 | 0x8000,
            chunk(msg(37, struct.pack("<QQQQQ", 0, 0x10000, 65536, UADDR + 0x10000, 0)), MEMFD)
            + chunk(msg(38, struct.pack("<QQQQQ", 0, 0, 65536, UADDR, 0))),
        ),
        # GET_INFLIGHT_FD then SET_INFLIGHT_FD.
        "inflight": bring_up(
            version1 | proto,
            0x1 | 0x8 | 0x200 | 0x1000,
            chunk(msg(31, struct.pack("<QQHH", 0, 0, 1, 16) + bytes(4)))
            + chunk(msg(32, struct.pack("<QQHH", 65536, 0, 1, 16) + bytes(4)), MEMFD),
        ),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


main()
