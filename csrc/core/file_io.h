// Whole transfers between memory and a file descriptor, resuming after short reads and writes.
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
        size_t left = static_cast<size_t>(n);
        while (first < iov.size() && left >= iov[first].iov_len) {
            left -= iov[first].iov_len;
            ++first;
        }
        if (left > 0) {
            iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
            iov[first].iov_len -= left;
        }
    }
    return static_cast<ssize_t>(moved);
}

}  // namespace ucm
