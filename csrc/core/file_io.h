// Whole transfers between memory and a file descriptor (or socket), resuming after short ones.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ucm {

constexpr size_t kMaxIov = 512;  // iovecs per system call, well under IOV_MAX

// Skips `bytes` already moved from iov[first...]: returns the first iovec with bytes left, and
// trims that one to what is left of it.
inline size_t advance_iov(std::vector<iovec>& iov, size_t first, size_t bytes) {
    while (first < iov.size() && bytes >= iov[first].iov_len) {
        bytes -= iov[first].iov_len;
        ++first;
    }
    if (bytes > 0) {
        iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + bytes;
        iov[first].iov_len -= bytes;
    }
    return first;
}

// Moves all of iov[] at `offset`, resuming after short transfers and EINTR. Returns the bytes
// moved (less than asked only at end of file, or when a write makes no progress) or -errno.
inline ssize_t transfer_all(int fd, std::vector<iovec> iov, off_t offset, bool write) {
    size_t moved = 0;
    size_t first = 0;
    while (first < iov.size()) {
        int count = static_cast<int>(std::min(iov.size() - first, kMaxIov));
        ssize_t n = write ? ::pwritev(fd, iov.data() + first, count, offset)
                          : ::preadv(fd, iov.data() + first, count, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) break;  // end of file
        moved += static_cast<size_t>(n);
        offset += n;
        first = advance_iov(iov, first, static_cast<size_t>(n));
    }
    return static_cast<ssize_t>(moved);
}

}  // namespace ucm
