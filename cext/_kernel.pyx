# cython: language_level=3
"""Kernel interfaces of dmrepl: device-mapper, loop and block device ioctls.

This module only marshals: it packs and unpacks the structs declared in the
.pxd files (one kernel header each), runs each system call without the GIL
and raises OSError(errno, strerror) when the kernel refuses.  Which call was
made on which device, retries and policy live in the Python modules above
(dmrepl/kernel/*.py), which add that context to the errors they re-raise.
"""

from libc.errno cimport errno, EINTR, EIO
from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, strncpy, strlen, memset
from posix.unistd cimport pread, pwrite

cimport dm_ioctl as dm
cimport loop as lp
cimport blkdev as bd

import os


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


cdef inline int _ioctl(int fd, unsigned long request, void *arg) noexcept nogil:
    """ioctl(2) that returns 0 or the errno, so callers can run it without the GIL."""
    if ioctl(fd, request, arg) < 0:
        return errno
    return 0


cdef inline _raise_errno(int err, path=None):
    if path is None:
        raise OSError(err, os.strerror(err))
    raise OSError(err, os.strerror(err), path)


# --------------------------------------------------------------------------
# device-mapper (<linux/dm-ioctl.h>)
# --------------------------------------------------------------------------

HEADER_SIZE = sizeof(dm.dm_ioctl)
TARGET_SPEC_SIZE = sizeof(dm.dm_target_spec)
NAME_LEN = dm.DM_NAME_LEN
UUID_LEN = dm.DM_UUID_LEN
MAX_TYPE_NAME = dm.DM_MAX_TYPE_NAME
HEADER_VERSION = (dm.DM_VERSION_MAJOR, dm.DM_VERSION_MINOR, dm.DM_VERSION_PATCHLEVEL)

DM_REQUESTS = {
    "DM_VERSION": dm.DM_VERSION,
    "DM_REMOVE_ALL": dm.DM_REMOVE_ALL,
    "DM_LIST_DEVICES": dm.DM_LIST_DEVICES,
    "DM_DEV_CREATE": dm.DM_DEV_CREATE,
    "DM_DEV_REMOVE": dm.DM_DEV_REMOVE,
    "DM_DEV_RENAME": dm.DM_DEV_RENAME,
    "DM_DEV_SUSPEND": dm.DM_DEV_SUSPEND,
    "DM_DEV_STATUS": dm.DM_DEV_STATUS,
    "DM_DEV_WAIT": dm.DM_DEV_WAIT,
    "DM_DEV_ARM_POLL": dm.DM_DEV_ARM_POLL,
    "DM_TABLE_LOAD": dm.DM_TABLE_LOAD,
    "DM_TABLE_CLEAR": dm.DM_TABLE_CLEAR,
    "DM_TABLE_DEPS": dm.DM_TABLE_DEPS,
    "DM_TABLE_STATUS": dm.DM_TABLE_STATUS,
    "DM_LIST_VERSIONS": dm.DM_LIST_VERSIONS,
    "DM_TARGET_MSG": dm.DM_TARGET_MSG,
    "DM_GET_TARGET_VERSION": dm.DM_GET_TARGET_VERSION,
}

DM_FLAGS = {
    "READONLY": dm.DM_READONLY_FLAG,
    "SUSPEND": dm.DM_SUSPEND_FLAG,
    "PERSISTENT_DEV": dm.DM_PERSISTENT_DEV_FLAG,
    "STATUS_TABLE": dm.DM_STATUS_TABLE_FLAG,
    "ACTIVE_PRESENT": dm.DM_ACTIVE_PRESENT_FLAG,
    "INACTIVE_PRESENT": dm.DM_INACTIVE_PRESENT_FLAG,
    "BUFFER_FULL": dm.DM_BUFFER_FULL_FLAG,
    "SKIP_BDGET": dm.DM_SKIP_BDGET_FLAG,
    "SKIP_LOCKFS": dm.DM_SKIP_LOCKFS_FLAG,
    "NOFLUSH": dm.DM_NOFLUSH_FLAG,
    "QUERY_INACTIVE_TABLE": dm.DM_QUERY_INACTIVE_TABLE_FLAG,
    "UEVENT_GENERATED": dm.DM_UEVENT_GENERATED_FLAG,
    "UUID": dm.DM_UUID_FLAG,
    "SECURE_DATA": dm.DM_SECURE_DATA_FLAG,
    "DATA_OUT": dm.DM_DATA_OUT_FLAG,
    "DEFERRED_REMOVE": dm.DM_DEFERRED_REMOVE,
    "INTERNAL_SUSPEND": dm.DM_INTERNAL_SUSPEND_FLAG,
}


def dm_call(int fd, unsigned long request, name=None, uuid=None,
            uint32_t flags=0, uint32_t event_nr=0, uint64_t dev=0,
            uint32_t target_count=0, bytes payload=b"", size_t buffer_size=16384):
    """Issue one device-mapper ioctl.

    The header asks for interface 4.0.0: the kernel accepts any request whose
    major number matches and whose minor is not newer than its own
    (drivers/md/dm-ioctl.c: check_version).  Returns a dict of the header the
    kernel wrote back and `data`, the bytes between data_start and data_size.
    """
    cdef size_t hdr = sizeof(dm.dm_ioctl)
    cdef size_t size = buffer_size
    cdef size_t plen = len(payload)
    if size < hdr + plen + 8:
        size = hdr + plen + 8
    cdef char *buf = <char *>calloc(1, size)
    if buf == NULL:
        raise MemoryError()
    cdef dm.dm_ioctl *io = <dm.dm_ioctl *>buf
    cdef int rc
    cdef int err = 0
    cdef bytes bname
    cdef bytes buuid
    try:
        io.version[0] = 4
        io.version[1] = 0
        io.version[2] = 0
        io.data_size = <uint32_t>size
        io.data_start = <uint32_t>hdr
        io.target_count = target_count
        io.flags = flags
        io.event_nr = event_nr
        io.dev = dev
        if name is not None:
            bname = name.encode() if isinstance(name, str) else name
            if len(bname) >= dm.DM_NAME_LEN:
                raise ValueError("device-mapper name longer than %d bytes" % (dm.DM_NAME_LEN - 1))
            strncpy(io.name, bname, dm.DM_NAME_LEN - 1)
        if uuid is not None:
            buuid = uuid.encode() if isinstance(uuid, str) else uuid
            if len(buuid) >= dm.DM_UUID_LEN:
                raise ValueError("device-mapper uuid longer than %d bytes" % (dm.DM_UUID_LEN - 1))
            strncpy(io.uuid, buuid, dm.DM_UUID_LEN - 1)
        if plen:
            memcpy(buf + hdr, <char *>payload, plen)
        with nogil:
            rc = ioctl(fd, request, buf)
            if rc < 0:
                err = errno
        if rc < 0:
            _raise_errno(err)
        start = io.data_start
        end = io.data_size
        if end > size:
            end = size
        if end < start:
            end = start
        return {
            "version": (io.version[0], io.version[1], io.version[2]),
            "flags": io.flags,
            "open_count": io.open_count,
            "event_nr": io.event_nr,
            "dev": io.dev,
            "target_count": io.target_count,
            "name": io.name[:strlen(io.name)].decode(errors="replace"),
            "uuid": io.uuid[:strlen(io.uuid)].decode(errors="replace"),
            "data": buf[start:end],
        }
    finally:
        free(buf)


def pack_targets(targets):
    """Pack (sector_start, length, target_type, params) tuples for DM_TABLE_LOAD.

    Each dm_target_spec is followed by its NUL-terminated parameter string,
    padded so that the next spec is 8-byte aligned; `next` is the distance
    from this spec to the next one (dm-ioctl.h).
    """
    cdef dm.dm_target_spec spec
    out = bytearray()
    for start, length, ttype, params in targets:
        btype = ttype.encode()
        bparams = params.encode() + b"\0"
        if len(btype) >= dm.DM_MAX_TYPE_NAME:
            raise ValueError("target type %r longer than %d bytes" % (ttype, dm.DM_MAX_TYPE_NAME - 1))
        total = sizeof(dm.dm_target_spec) + len(bparams)
        total = (total + 7) & ~7
        memset(&spec, 0, sizeof(spec))
        spec.sector_start = start
        spec.length = length
        spec.status = 0
        spec.next = <uint32_t>total
        strncpy(spec.target_type, btype, dm.DM_MAX_TYPE_NAME - 1)
        out += (<char *>&spec)[:sizeof(spec)]
        out += bparams
        out += b"\0" * (total - sizeof(spec) - len(bparams))
    return bytes(out)


def unpack_targets(bytes data, uint32_t count):
    """Unpack DM_TABLE_STATUS output: `count` specs, each `next` bytes from the first."""
    cdef const char *base = data
    cdef size_t n = len(data)
    cdef size_t off = 0
    cdef const dm.dm_target_spec *spec
    result = []
    for _ in range(count):
        if off + sizeof(dm.dm_target_spec) > n:
            raise ValueError("truncated dm_target_spec at offset %d" % off)
        spec = <const dm.dm_target_spec *>(base + off)
        pstart = off + sizeof(dm.dm_target_spec)
        pend = data.find(b"\0", pstart)
        if pend < 0:
            pend = n
        ttype = spec.target_type[:strlen(spec.target_type)].decode()
        result.append((spec.sector_start, spec.length, ttype,
                       data[pstart:pend].decode(errors="replace")))
        off = spec.next
    return result


cdef inline size_t _align8(size_t x):
    return (x + 7) & ~(<size_t>7)


def unpack_name_list(bytes data):
    """Unpack DM_LIST_DEVICES output into (name, dev, event_nr, uuid-or-None) tuples.

    Since interface 4.46 each record carries event_nr, flags and the uuid
    after the 8-byte aligned end of the name (dm-ioctl.h: dm_name_list).
    """
    cdef const char *base = data
    cdef size_t n = len(data)
    cdef size_t off = 0
    cdef const dm.dm_name_list *nl
    cdef size_t name_off, tail, end
    cdef uint32_t ev, fl
    result = []
    if n < sizeof(dm.dm_name_list):
        return result
    while True:
        nl = <const dm.dm_name_list *>(base + off)
        if off == 0 and nl.dev == 0:
            break  # "nl->dev = 0: flags no data" (dm-ioctl.c: list_devices)
        name_off = off + 12
        nend = data.find(b"\0", name_off)
        if nend < 0:
            break
        name = data[name_off:nend].decode(errors="replace")
        end = off + nl.next if nl.next else n
        tail = _align8(nend + 1)
        ev = 0
        uuid = None
        if tail + 8 <= end:
            ev = (<const uint32_t *>(base + tail))[0]
            fl = (<const uint32_t *>(base + tail + 4))[0]
            if fl & dm.DM_NAME_LIST_FLAG_HAS_UUID:
                uend = data.find(b"\0", tail + 8)
                if uend >= 0:
                    uuid = data[tail + 8:uend].decode(errors="replace")
        result.append((name, nl.dev, ev, uuid))
        if not nl.next:
            break
        off += nl.next
        if off + sizeof(dm.dm_name_list) > n:
            break
    return result


def unpack_versions(bytes data):
    """Unpack DM_LIST_VERSIONS output into (target_name, (major, minor, patch))."""
    cdef const char *base = data
    cdef size_t n = len(data)
    cdef size_t off = 0
    cdef const dm.dm_target_versions *tv
    result = []
    while off + sizeof(dm.dm_target_versions) <= n:
        tv = <const dm.dm_target_versions *>(base + off)
        nstart = off + 16
        nend = data.find(b"\0", nstart)
        if nend < 0:
            break
        result.append((data[nstart:nend].decode(), (tv.version[0], tv.version[1], tv.version[2])))
        if not tv.next:
            break
        off += tv.next
    return result


def unpack_deps(bytes data):
    """Unpack DM_TABLE_DEPS output into a list of encoded dev_t values."""
    cdef const char *base = data
    if len(data) < 8:
        return []
    cdef uint32_t count = (<const uint32_t *>base)[0]
    cdef const uint64_t *devs = <const uint64_t *>(base + 8)
    if 8 + 8 * count > len(data):
        raise ValueError("truncated dm_target_deps")
    return [devs[i] for i in range(count)]


def pack_message(uint64_t sector, str message):
    """Pack a struct dm_target_msg for DM_TARGET_MSG."""
    return (<char *>&sector)[:8] + message.encode() + b"\0"


# --------------------------------------------------------------------------
# loop devices (<linux/loop.h>)
# --------------------------------------------------------------------------

LO_FLAGS = {
    "READ_ONLY": lp.LO_FLAGS_READ_ONLY,
    "AUTOCLEAR": lp.LO_FLAGS_AUTOCLEAR,
    "PARTSCAN": lp.LO_FLAGS_PARTSCAN,
    "DIRECT_IO": lp.LO_FLAGS_DIRECT_IO,
}


def loop_ctl_get_free(int ctl_fd):
    """LOOP_CTL_GET_FREE on /dev/loop-control: the number of a free loop device."""
    cdef int rc
    cdef int err = 0
    with nogil:
        rc = ioctl(ctl_fd, lp.LOOP_CTL_GET_FREE)
        if rc < 0:
            err = errno
    if rc < 0:
        _raise_errno(err, "/dev/loop-control")
    return rc


def loop_configure(int loop_fd, int file_fd, uint32_t flags=0, uint64_t offset=0,
                   uint64_t sizelimit=0, uint32_t block_size=0, file_name=None):
    """LOOP_CONFIGURE: bind file_fd to the loop device in one call (Linux >= 5.8)."""
    cdef lp.loop_config cfg
    cdef int err = 0
    memset(&cfg, 0, sizeof(cfg))
    cfg.fd = file_fd
    cfg.block_size = block_size
    cfg.info.lo_offset = offset
    cfg.info.lo_sizelimit = sizelimit
    cfg.info.lo_flags = flags
    if file_name is not None:
        bname = os.fsencode(file_name)[:lp.LO_NAME_SIZE - 1]
        memcpy(cfg.info.lo_file_name, <char *>bname, len(bname))
    with nogil:
        err = _ioctl(loop_fd, lp.LOOP_CONFIGURE, <void *>&cfg)
    if err:
        _raise_errno(err)


def loop_clr_fd(int loop_fd):
    """LOOP_CLR_FD: unbind the backing file (deferred to last close if still open)."""
    cdef int err = 0
    with nogil:
        err = _ioctl(loop_fd, lp.LOOP_CLR_FD, NULL)
    if err:
        _raise_errno(err)


def loop_get_status64(int loop_fd):
    """LOOP_GET_STATUS64 as a dict; ENXIO means the device is not bound."""
    cdef lp.loop_info64 info
    cdef int err = 0
    memset(&info, 0, sizeof(info))
    with nogil:
        err = _ioctl(loop_fd, lp.LOOP_GET_STATUS64, <void *>&info)
    if err:
        _raise_errno(err)
    fname = bytes(info.lo_file_name[:lp.LO_NAME_SIZE]).split(b"\0", 1)[0]
    return {
        "number": info.lo_number,
        "backing_dev": info.lo_device,
        "backing_inode": info.lo_inode,
        "offset": info.lo_offset,
        "sizelimit": info.lo_sizelimit,
        "flags": info.lo_flags,
        "file_name": os.fsdecode(fname),
    }


def loop_set_capacity(int loop_fd):
    """LOOP_SET_CAPACITY: re-read the size of the backing file."""
    cdef int err = 0
    with nogil:
        err = _ioctl(loop_fd, lp.LOOP_SET_CAPACITY, NULL)
    if err:
        _raise_errno(err)


# --------------------------------------------------------------------------
# block devices (<linux/fs.h>)
# --------------------------------------------------------------------------

def blk_size_bytes(int fd):
    """BLKGETSIZE64: device size in bytes."""
    cdef uint64_t size = 0
    cdef int err = 0
    with nogil:
        err = _ioctl(fd, bd.BLKGETSIZE64, <void *>&size)
    if err:
        _raise_errno(err)
    return size


def blk_logical_block_size(int fd):
    """BLKSSZGET: logical block size in bytes."""
    cdef int ssz = 0
    cdef int err = 0
    with nogil:
        err = _ioctl(fd, bd.BLKSSZGET, <void *>&ssz)
    if err:
        _raise_errno(err)
    return ssz


def blk_discard(int fd, uint64_t offset_bytes, uint64_t length_bytes):
    """BLKDISCARD over [offset, offset + length) in bytes."""
    cdef uint64_t rng[2]
    cdef int err = 0
    rng[0] = offset_bytes
    rng[1] = length_bytes
    with nogil:
        err = _ioctl(fd, bd.BLKDISCARD, <void *>rng)
    if err:
        _raise_errno(err)


def copy_extents(int src_fd, int dst_fd, extents, size_t io_bytes=1 << 20,
                 uint64_t dst_shift=0, progress=None):
    """Copy (offset_bytes, length_bytes) extents from src_fd to dst_fd.

    Data moves through one 4 KiB-aligned buffer of io_bytes (so O_DIRECT
    descriptors work) with the GIL released around every pread/pwrite.
    `progress(bytes_done)` is called after each chunk.  Returns bytes copied.
    """
    cdef char *buf = NULL
    cdef uint64_t off, remaining, done = 0
    cdef size_t want, got
    cdef ssize_t r
    cdef int err = 0
    cdef int stage = 0
    if io_bytes == 0 or io_bytes % 4096:
        raise ValueError("io_bytes must be a positive multiple of 4096")
    if posix_memalign(<void **>&buf, 4096, io_bytes) != 0:
        raise MemoryError()
    try:
        for offset, length in extents:
            off = offset
            remaining = length
            while remaining:
                want = io_bytes if remaining > io_bytes else remaining
                with nogil:
                    got = 0
                    while got < want:
                        r = pread(src_fd, buf + got, want - got, off + got)
                        if r < 0:
                            if errno == EINTR:
                                continue
                            err = errno
                            stage = 1
                            break
                        if r == 0:
                            stage = 2
                            break
                        got += r
                    if stage == 0:
                        got = 0
                        while got < want:
                            r = pwrite(dst_fd, buf + got, want - got, off + dst_shift + got)
                            if r < 0:
                                if errno == EINTR:
                                    continue
                                err = errno
                                stage = 3
                                break
                            got += r
                if stage == 1:
                    raise OSError(err, "read at byte %d: %s" % (off, os.strerror(err)))
                if stage == 2:
                    # pread returned 0: the source ends inside an extent.  EIO, not
                    # errno 0, so that callers branching on errno see a failure.
                    raise OSError(EIO, "read at byte %d: the source ends before the extent does" % off)
                if stage == 3:
                    raise OSError(err, "write at byte %d: %s" % (off + dst_shift, os.strerror(err)))
                off += want
                remaining -= want
                done += want
                if progress is not None:
                    progress(done)
        return done
    finally:
        free(buf)
