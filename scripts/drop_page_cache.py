#!/usr/bin/env python3
"""Flushes files and asks the kernel to drop them from the page cache (posix_fadvise
DONTNEED), so that the next mapping reads them from disk as a fresh checkpoint would be.

    scripts/drop_page_cache.py FILE...
"""
import os
import sys

for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
