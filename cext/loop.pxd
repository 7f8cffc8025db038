# Declarations from <linux/loop.h> (Linux 6.1 uapi): LOOP_CONFIGURE needs >= 5.8.
from libc.stdint cimport uint32_t, uint64_t, uint8_t

cdef extern from "<linux/loop.h>":
    enum:
        LO_NAME_SIZE
        LO_FLAGS_READ_ONLY
        LO_FLAGS_AUTOCLEAR
        LO_FLAGS_PARTSCAN
        LO_FLAGS_DIRECT_IO

    struct loop_info64:
        uint64_t lo_device
        uint64_t lo_inode
        uint64_t lo_rdevice
        uint64_t lo_offset
        uint64_t lo_sizelimit
        uint32_t lo_number
        uint32_t lo_flags
        uint8_t lo_file_name[64]

    struct loop_config:
        uint32_t fd
        uint32_t block_size
        loop_info64 info

    unsigned long LOOP_CLR_FD
    unsigned long LOOP_GET_STATUS64
    unsigned long LOOP_SET_CAPACITY
    unsigned long LOOP_CONFIGURE
    unsigned long LOOP_CTL_GET_FREE
