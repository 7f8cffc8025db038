# Declarations from <linux/fs.h> (Linux 6.1 uapi): block device ioctls.
cdef extern from "<linux/fs.h>":
    unsigned long BLKGETSIZE64
    unsigned long BLKSSZGET
    unsigned long BLKPBSZGET
    unsigned long BLKROGET
    unsigned long BLKDISCARD
    unsigned long BLKFLSBUF
