# Declarations from <linux/dm-ioctl.h>, interface version 4.47 (Linux 6.1 uapi).
# Only what dmrepl uses is declared; layouts come from the header at build time.
from libc.stdint cimport uint32_t, int32_t, uint64_t

cdef extern from "<linux/dm-ioctl.h>":
    enum:
        DM_NAME_LEN
        DM_UUID_LEN
        DM_MAX_TYPE_NAME
        DM_VERSION_MAJOR
        DM_VERSION_MINOR
        DM_VERSION_PATCHLEVEL

    struct dm_ioctl:
        uint32_t version[3]
        uint32_t data_size
        uint32_t data_start
        uint32_t target_count
        int32_t open_count
        uint32_t flags
        uint32_t event_nr
        uint64_t dev
        char name[128]
        char uuid[129]

    struct dm_target_spec:
        uint64_t sector_start
        uint64_t length
        int32_t status
        uint32_t next
        char target_type[16]

    struct dm_target_deps:
        uint32_t count
        uint64_t dev[1]

    struct dm_name_list:
        uint64_t dev
        uint32_t next
        char name[1]

    struct dm_target_versions:
        uint32_t next
        uint32_t version[3]
        char name[1]

    struct dm_target_msg:
        uint64_t sector
        char message[1]

    # ioctl request numbers
    unsigned long DM_VERSION
    unsigned long DM_REMOVE_ALL
    unsigned long DM_LIST_DEVICES
    unsigned long DM_DEV_CREATE
    unsigned long DM_DEV_REMOVE
    unsigned long DM_DEV_RENAME
    unsigned long DM_DEV_SUSPEND
    unsigned long DM_DEV_STATUS
    unsigned long DM_DEV_WAIT
    unsigned long DM_DEV_ARM_POLL
    unsigned long DM_TABLE_LOAD
    unsigned long DM_TABLE_CLEAR
    unsigned long DM_TABLE_DEPS
    unsigned long DM_TABLE_STATUS
    unsigned long DM_LIST_VERSIONS
    unsigned long DM_TARGET_MSG
    unsigned long DM_GET_TARGET_VERSION

    # flags
    uint32_t DM_READONLY_FLAG
    uint32_t DM_SUSPEND_FLAG
    uint32_t DM_PERSISTENT_DEV_FLAG
    uint32_t DM_STATUS_TABLE_FLAG
    uint32_t DM_ACTIVE_PRESENT_FLAG
    uint32_t DM_INACTIVE_PRESENT_FLAG
    uint32_t DM_BUFFER_FULL_FLAG
    uint32_t DM_SKIP_BDGET_FLAG
    uint32_t DM_SKIP_LOCKFS_FLAG
    uint32_t DM_NOFLUSH_FLAG
    uint32_t DM_QUERY_INACTIVE_TABLE_FLAG
    uint32_t DM_UEVENT_GENERATED_FLAG
    uint32_t DM_UUID_FLAG
    uint32_t DM_SECURE_DATA_FLAG
    uint32_t DM_DATA_OUT_FLAG
    uint32_t DM_DEFERRED_REMOVE
    uint32_t DM_INTERNAL_SUSPEND_FLAG
    uint32_t DM_NAME_LIST_FLAG_HAS_UUID
