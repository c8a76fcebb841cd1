#include "posix_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <memory>
#include <stdexcept>
#include <unordered_map>

#include "block_format.h"
#include "checksum.h"
#include "file_io.h"
#include "sink.h"

namespace ucm {
namespace {

constexpr size_t kDirCount = 4096;         // blocks/<3 hex digits>/
constexpr size_t kPieceBytes = 256 << 10;  // checksum each piece while it is still in the CPU cache
constexpr int64_t kTouchSeconds = 30;      // recency is refreshed at most this often per file
constexpr size_t kDirectAlign = 4096;
constexpr int64_t kTmpGraceSeconds = 600;  // a temporary file untouched this long has no live writer
constexpr int64_t kLeaseSeconds = 120;     // an eviction lease older than this is abandoned
constexpr const char* kLease = "evict.lease";  // in the root, while a process runs an eviction pass
constexpr double kEvictTarget = 0.9;       // evict down to this fraction of the capacity
constexpr size_t kMaxFillQueue = 16384;    // files waiting to be copied into the shared tier
constexpr int kCloseFillSeconds = 5;       // close() spends at most this on copies still queued
const std::string kSizeMismatch = kSizeMismatchPrefix;  // the caller's buffers differ from the stored size

std::string errno_text(int err) { return std::strerror(err); }

std::string to_hex(const std::string& bytes) {
    static const char digits[] = "0123456789abcdef";
    std::string out(bytes.size() * 2, '0');
    for (size_t i = 0; i < bytes.size(); ++i) {
        uint8_t b = static_cast<uint8_t>(bytes[i]);
        out[2 * i] = digits[b >> 4];
        out[2 * i + 1] = digits[b & 15];
    }
    return out;
}

bool ends_with(const std::string& text, const std::string& suffix) {
    return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

size_t align_up(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

int64_t mtime_ns(const struct stat& st) { return st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec; }

struct FdGuard {
    int fd;
    ~FdGuard() {
        if (fd >= 0) ::close(fd);
    }
};

// Walks a shard's buffers in pieces of at most `bytes`, as iovecs (zero-length buffers skipped).
class PieceCursor {
public:
    explicit PieceCursor(const std::vector<Buffer>& buffers) : buffers_(buffers) { skip_empty(); }
    bool done() const { return index_ == buffers_.size(); }
    std::vector<iovec> next(size_t bytes) {
        std::vector<iovec> piece;
        while (!done() && bytes > 0 && piece.size() < kMaxIov) {
            const Buffer& b = buffers_[index_];
            size_t take = std::min(b.size - within_, bytes);
            piece.push_back({b.data + within_, take});
            bytes -= take;
            within_ += take;
            if (within_ == b.size) {
                ++index_;
                within_ = 0;
                skip_empty();
            }
        }
        return piece;
    }

private:
    void skip_empty() {
        while (!done() && buffers_[index_].size == 0) ++index_;
    }
    const std::vector<Buffer>& buffers_;
    size_t index_ = 0;
    size_t within_ = 0;
};

// A per-thread buffer aligned for O_DIRECT (also the bounce buffer of loads into a sink), grown
// on demand and kept for the next transfer.
uint8_t* direct_staging(size_t bytes) {
    struct Staging {
        uint8_t* data = nullptr;
        size_t size = 0;
        ~Staging() { std::free(data); }
    };
    thread_local Staging staging;
    if (staging.size < bytes) {
        std::free(staging.data);
        staging.data = static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, align_up(bytes, kDirectAlign)));
        staging.size = staging.data ? bytes : 0;
    }
    return staging.data;
}

// What the shared tier needs to know about a store file: its identity (see FileIdentity), its
// mtime (recency) and size. statx, for the birth time.
struct FileFacts {
    FileIdentity identity;
    int64_t mtime_s = 0;
    uint64_t size = 0;
};

bool file_facts(int dirfd, const char* path, int flags, FileFacts* out) {
    struct statx stx;
    if (::statx(dirfd, path, flags, STATX_INO | STATX_MTIME | STATX_SIZE | STATX_BTIME, &stx) != 0) return false;
    uint64_t born = (stx.stx_mask & STATX_BTIME) != 0
                        ? static_cast<uint64_t>(stx.stx_btime.tv_sec) * 1000000000ULL + stx.stx_btime.tv_nsec
                        : 0;
    // The size too: store files never change once in place, so a file truncated or grown in
    // place (damage) no longer matches the copy made from it, and the load finds the damage.
    uint64_t words[4] = {stx.stx_dev_major, stx.stx_dev_minor, born, stx.stx_size};
    out->identity = {stx.stx_ino, hash_key(words, sizeof(words))};
    out->mtime_s = stx.stx_mtime.tv_sec;
    out->size = stx.stx_size;
    return true;
}

uint64_t host_hash() {
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    return hash_key(host, std::strlen(host));
}

}  // namespace

PosixStore::PosixStore(PosixConfig config)
    : config_(std::move(config)),
      pool_(config_.threads, "ucm-posix-io"),
      save_pool_(config_.threads, "ucm-posix-save") {
    if (config_.num_shards == 0) throw std::invalid_argument("num_shards must be at least 1");
    root_fd_ = ::open(config_.root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root_fd_ < 0) throw std::invalid_argument("cannot open root " + config_.root + ": " + errno_text(errno));
    if (::mkdirat(root_fd_, "blocks", 0755) != 0 && errno != EEXIST) {
        int err = errno;
        ::close(root_fd_);
        throw std::invalid_argument("cannot create " + config_.root + "/blocks: " + errno_text(err));
    }
    blocks_fd_ = ::openat(root_fd_, "blocks", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (blocks_fd_ < 0) {
        int err = errno;
        ::close(root_fd_);
        throw std::invalid_argument("cannot open " + config_.root + "/blocks: " + errno_text(err));
    }
    char prefix[64];
    std::snprintf(prefix, sizeof(prefix), ".tmp.%016llx.%d.", static_cast<unsigned long long>(host_hash()),
                  static_cast<int>(::getpid()));
    tmp_prefix_ = prefix;
    if (config_.direct_io) {
        std::string probe = tmp_prefix_ + "direct-probe";
        int fd = ::openat(root_fd_, probe.c_str(), O_CREAT | O_WRONLY | O_DIRECT | O_CLOEXEC, 0644);
        int err = errno;
        if (fd >= 0) {
            ::close(fd);
            ::unlinkat(root_fd_, probe.c_str(), 0);
        } else {
            ::close(blocks_fd_);
            ::close(root_fd_);
            throw std::invalid_argument("the filesystem at root " + config_.root +
                                        " refuses O_DIRECT (" + errno_text(err) +
                                        "); set direct_io to false for this root");
        }
    }
    if (config_.shared_memory_bytes > 0) {
        if (config_.shared_memory_name.empty() || config_.shared_memory_name.find('/') != std::string::npos) {
            ::close(blocks_fd_);
            ::close(root_fd_);
            throw std::invalid_argument("shared_memory_name must be a non-empty file name prefix");
        }
        tier_ = std::make_unique<SharedTier>(config_.shared_memory_dir, config_.shared_memory_name,
                                             config_.shared_memory_bytes);
        filler_ = std::thread([this] { fill_loop(); });
    }
    if (config_.capacity_bytes > 0) {
        evict_requested_ = true;  // enforce the capacity and clean up once at start
        evictor_ = std::thread([this] {
            name_this_thread("ucm-posix-evict");
            evictor_loop();
        });
    }
}

PosixStore::~PosixStore() { close(); }

void PosixStore::close() {
    std::lock_guard<std::mutex> guard(close_mutex_);
    if (closed_) return;
    closed_ = true;
    {
        std::lock_guard<std::mutex> lock(evict_mutex_);
        stopping_ = true;
    }
    evict_cv_.notify_all();
    if (evictor_.joinable()) evictor_.join();
    prewarm_stop_.store(true);
    if (prewarmer_.joinable()) prewarmer_.join();
    save_pool_.shutdown();
    pool_.shutdown();
    {
        std::lock_guard<std::mutex> lock(fill_mutex_);
        fill_stopping_ = true;
    }
    fill_cv_.notify_all();
    if (filler_.joinable()) filler_.join();
    std::vector<std::string> unfilled;
    unfilled.swap(fill_queue_);  // the filler is gone: no lock needed
    if (tier_) {
        // Copies still queued (the last saves of an engine that exits, say) are made now, within
        // a bound on the time it takes.
        auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(kCloseFillSeconds);
        for (const std::string& path : unfilled) {
            if (std::chrono::steady_clock::now() > deadline) break;
            fill_tier(path);
        }
        tier_->close();
    }
    ::close(blocks_fd_);
    ::close(root_fd_);
}

// ---- naming --------------------------------------------------------------------------------

std::string PosixStore::block_dir(const std::string& id) const {
    char dir[8];
    std::snprintf(dir, sizeof(dir), "%03x", static_cast<unsigned>(hash_key(id.data(), id.size()) % kDirCount));
    return dir;
}

std::string PosixStore::block_base(const std::string& id) const { return block_dir(id) + "/" + to_hex(id); }

std::string PosixStore::shard_path(const std::string& id, uint32_t shard) const {
    if (config_.num_shards == 1) return block_base(id);
    return block_base(id) + "." + std::to_string(shard);
}

std::string PosixStore::visible_path(const std::string& id) const {
    return config_.num_shards == 1 ? block_base(id) : block_base(id) + ".ok";
}

bool PosixStore::exists(const std::string& path) const {
    return ::faccessat(blocks_fd_, path.c_str(), F_OK, 0) == 0;
}

bool PosixStore::present(const std::string& id) const { return exists(visible_path(id)); }

// ---- lookups -------------------------------------------------------------------------------

std::vector<uint8_t> PosixStore::lookup(const std::vector<std::string>& ids) {
    std::vector<uint8_t> found(ids.size(), 0);
    auto body = [&](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i) found[i] = present(ids[i]) ? 1 : 0;
    };
    if (ids.size() < 256) {
        body(0, ids.size());
    } else {
        pool_.parallel_for(ids.size(), pool_.size() + 1, body);
    }
    return found;
}

size_t PosixStore::lookup_prefix(const std::vector<std::string>& ids) {
    // Look ahead in growing windows so long hits run in parallel while an early miss costs little.
    size_t window = 16;
    for (size_t begin = 0; begin < ids.size(); begin += window, window = std::min<size_t>(window * 2, 4096)) {
        size_t end = std::min(ids.size(), begin + window);
        std::vector<std::string> slice(ids.begin() + begin, ids.begin() + end);
        std::vector<uint8_t> found = lookup(slice);
        for (size_t i = 0; i < found.size(); ++i) {
            if (!found[i]) return begin + i;
        }
    }
    return ids.size();
}

// ---- dump ----------------------------------------------------------------------------------

TaskPtr PosixStore::dump(std::vector<ShardIO> items) {
    // Saves run on their own threads, so a load never queues behind writes. They stay at normal
    // priority: a kv_producer's step and a memory tier's write-behind wait on them, and their
    // workers take locks that the engine's thread takes too (the pool's queue, each task's state).
    return run_items(save_pool_, std::move(items), [this](const ShardIO& item) { return dump_one(item); });
}

int PosixStore::open_tmp(const std::string& dir, std::string* tmp_name) {
    *tmp_name = dir + "/" + tmp_prefix_ + std::to_string(tmp_seq_.fetch_add(1));
    int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (config_.direct_io ? O_DIRECT : 0);
    int fd = ::openat(blocks_fd_, tmp_name->c_str(), flags, 0644);
    if (fd < 0 && errno == ENOENT) {
        ::mkdirat(blocks_fd_, dir.c_str(), 0755);
        fd = ::openat(blocks_fd_, tmp_name->c_str(), flags, 0644);
    }
    return fd;
}

std::string PosixStore::dump_one(const ShardIO& item) {
    std::string final_path = shard_path(item.id, item.shard);
    if (!exists(final_path)) {
        std::string tmp;
        int fd = open_tmp(block_dir(item.id), &tmp);
        if (fd < 0) return "cannot create a file under " + config_.root + "/blocks: " + errno_text(errno);
        uint64_t checksum = 0;
        std::string error = write_shard(fd, item, &checksum);
        if (error.empty() && config_.fsync && ::fdatasync(fd) != 0) error = "fdatasync failed: " + errno_text(errno);
        // The file's identity for the shared tier's copy (renaming keeps it).
        FileFacts facts;
        bool known = tier_ && error.empty() && file_facts(fd, "", AT_EMPTY_PATH, &facts);
        if (::close(fd) != 0 && error.empty()) error = "close failed: " + errno_text(errno);
        if (error.empty() && ::renameat(blocks_fd_, tmp.c_str(), blocks_fd_, final_path.c_str()) != 0) {
            error = "cannot rename into place: " + errno_text(errno);
        }
        if (!error.empty()) {
            ::unlinkat(blocks_fd_, tmp.c_str(), 0);
            return error;
        }
        note_written(item.total_bytes() + kTrailerBytes);
        // The shared tier's copy comes from the bytes just written, while they are still in
        // memory: no read of the file back and no second checksum pass. It is made here, on the
        // save's thread, rather than on a thread of idle priority: the engine's steps measured
        // about 4% slower with such a thread copying between them (see docs/store.md).
        if (known) tier_->write(item.id, item.shard, item.buffers, checksum, facts.identity);
    }
    if (config_.num_shards > 1) commit_marker_if_complete(item.id);
    return {};
}

std::string PosixStore::write_shard(int fd, const ShardIO& item, uint64_t* checksum_out) {
    size_t total = item.total_bytes();
    Trailer trailer;
    trailer.payload_bytes = total;
    trailer.shard = item.shard;
    trailer.num_shards = config_.num_shards;
    trailer.id = item.id;
    uint8_t trailer_bytes[kTrailerBytes];

    if (config_.direct_io) {
        size_t file_bytes = align_up(total + kTrailerBytes, kDirectAlign);
        uint8_t* staging = direct_staging(file_bytes);
        if (staging == nullptr) return "out of memory for a direct I/O staging buffer";
        size_t offset = 0;
        for (const Buffer& b : item.buffers) {
            std::memcpy(staging + offset, b.data, b.size);
            offset += b.size;
        }
        trailer.checksum = Checksum::of(staging, total);
        *checksum_out = trailer.checksum;
        encode_trailer(trailer, staging + total);
        std::memset(staging + total + kTrailerBytes, 0, file_bytes - total - kTrailerBytes);
        ssize_t n = transfer_all(fd, {{staging, file_bytes}}, 0, true);
        if (n < 0) return "write failed: " + errno_text(static_cast<int>(-n));
        return {};
    }

    // Write in pieces and checksum each piece right after the kernel has read it, while it is
    // still in the CPU cache; the trailer with the checksum goes last.
    Checksum checksum;
    off_t offset = 0;
    for (PieceCursor cursor(item.buffers); !cursor.done();) {
        std::vector<iovec> piece = cursor.next(kPieceBytes);
        size_t piece_bytes = 0;
        for (const iovec& v : piece) piece_bytes += v.iov_len;
        ssize_t n = transfer_all(fd, piece, offset, true);
        if (n < 0) return "write failed: " + errno_text(static_cast<int>(-n));
        if (static_cast<size_t>(n) != piece_bytes) return "short write (disk full?)";
        for (const iovec& v : piece) checksum.update(v.iov_base, v.iov_len);
        offset += static_cast<off_t>(piece_bytes);
    }
    trailer.checksum = checksum.finish();
    *checksum_out = trailer.checksum;
    encode_trailer(trailer, trailer_bytes);
    ssize_t n = transfer_all(fd, {{trailer_bytes, kTrailerBytes}}, offset, true);
    if (n < 0) return "write failed: " + errno_text(static_cast<int>(-n));
    if (static_cast<size_t>(n) != kTrailerBytes) return "short write (disk full?)";
    return {};
}

void PosixStore::commit_marker_if_complete(const std::string& id) {
    // Each writer renames its own shard into place before looking at the others, so whichever
    // writer finishes last sees every shard and makes the block visible.
    std::string marker = visible_path(id);
    if (exists(marker)) return;
    for (uint32_t shard = 0; shard < config_.num_shards; ++shard) {
        if (!exists(shard_path(id, shard))) return;
    }
    int fd = ::openat(blocks_fd_, marker.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) ::close(fd);
}

// ---- load ----------------------------------------------------------------------------------

TaskPtr PosixStore::load(std::vector<ShardIO> items) {
    return run_items(pool_, std::move(items), [this](const ShardIO& item) { return load_one(item); });
}

std::string PosixStore::load_one(const ShardIO& item) {
    if (config_.num_shards > 1 && !exists(visible_path(item.id))) return "not found";
    std::string path = shard_path(item.id, item.shard);
    bool tier_missed = false;
    if (tier_) {
        // The tier serves a copy only of the file the store holds now (see FileIdentity).
        FileFacts facts;
        if (!file_facts(blocks_fd_, path.c_str(), 0, &facts)) {
            return errno == ENOENT ? "not found" : "cannot stat: " + errno_text(errno);
        }
        SharedTier::Read read = tier_->read(item, facts.identity);
        if (read == SharedTier::Read::kHit) {
            touch_path(path, facts.mtime_s);
            return {};
        }
        tier_missed = read != SharedTier::Read::kUnavailable;
    }
    int flags = O_RDONLY | O_CLOEXEC | (config_.direct_io ? O_DIRECT : 0);
    FdGuard fd{::openat(blocks_fd_, path.c_str(), flags)};
    if (fd.fd < 0) return errno == ENOENT ? "not found" : "cannot open: " + errno_text(errno);
    std::string error;
    if (config_.direct_io) {
        error = read_shard_direct(fd.fd, item);
    } else {
        error = item.sink != nullptr ? read_shard_to_sink(fd.fd, item) : read_shard(fd.fd, item);
    }
    if (error.empty()) {
        touch(fd.fd);
        if (tier_missed) queue_fill(path);  // for the next load by any process
    } else if (is_damage(error)) {
        discard_damaged(fd.fd, path, item.id);
    }
    return error;
}

bool PosixStore::touched_recently(int64_t mtime_s) {
    // Recency for eviction lives in the file's mtime. Refreshing it costs a metadata write (an
    // RPC on NFS), so a file touched recently is left alone: eviction needs no finer order.
    return static_cast<int64_t>(std::time(nullptr)) - mtime_s < kTouchSeconds;
}

void PosixStore::touch(int fd) {
    struct stat st;
    if (::fstat(fd, &st) == 0 && touched_recently(st.st_mtim.tv_sec)) return;
    ::futimens(fd, nullptr);
}

void PosixStore::touch_path(const std::string& path, int64_t mtime_s) const {
    if (touched_recently(mtime_s)) return;
    ::utimensat(blocks_fd_, path.c_str(), nullptr, 0);
}

bool PosixStore::is_damage(const std::string& error) {
    // Everything but a caller's size mismatch and I/O or memory trouble means the file is bad.
    for (const std::string& benign : {kSizeMismatch, std::string("read failed"), std::string("out of memory")}) {
        if (error.rfind(benign, 0) == 0) return false;
    }
    return true;
}

void PosixStore::discard_damaged(int fd, const std::string& path, const std::string& id) {
    // Remove the damaged file so the next dump writes the block again, unless a writer has
    // renamed a new file into place since we opened it.
    struct stat opened;
    struct stat current;
    if (::fstat(fd, &opened) != 0 || ::fstatat(blocks_fd_, path.c_str(), &current, 0) != 0) return;
    if (opened.st_ino != current.st_ino || opened.st_dev != current.st_dev) return;
    if (config_.num_shards > 1) ::unlinkat(blocks_fd_, visible_path(id).c_str(), 0);
    ::unlinkat(blocks_fd_, path.c_str(), 0);
}

static bool find_trailer(int fd, size_t size, Trailer* trailer) {
    // The trailer ends the file, or (files written with O_DIRECT) is followed by fewer than
    // kDirectAlign zero bytes. Read the tail once and try each end the zero padding allows, from
    // the file's end back to the first nonzero byte. The read is page aligned, so it also works
    // on a descriptor opened with O_DIRECT.
    size_t tail = std::min(size, kDirectAlign + kTrailerBytes - 1);
    if (tail < kTrailerBytes) return false;
    size_t first = (size - tail) / kDirectAlign * kDirectAlign;
    size_t span = align_up(size, kDirectAlign) - first;
    std::unique_ptr<uint8_t, decltype(&std::free)> window(static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, span)),
                                                          &std::free);
    if (!window) return false;
    ssize_t n = ::pread(fd, window.get(), span, static_cast<off_t>(first));
    if (n < 0 || static_cast<size_t>(n) < size - first) return false;
    const uint8_t* raw = window.get() + (size - tail - first);
    for (size_t end = tail; end >= kTrailerBytes; --end) {
        if (decode_trailer(raw + end - kTrailerBytes, trailer).empty() &&
            trailer->payload_bytes == size - tail + end - kTrailerBytes) {
            return true;
        }
        if (raw[end - 1] != 0) return false;  // padding is zeros: no trailer ends before this byte
    }
    return false;
}

std::string PosixStore::explain_size_mismatch(int fd, size_t expected) const {
    // A whole file whose trailer records another payload size is the caller's size mismatch, not
    // damage: the file stays. The trailer may be followed by O_DIRECT's zero padding.
    struct stat st;
    if (::fstat(fd, &st) != 0) return "cannot stat the stored shard: " + errno_text(errno);
    size_t size = static_cast<size_t>(st.st_size);
    if (size < kTrailerBytes) return "stored shard is truncated (" + std::to_string(size) + " bytes)";
    Trailer stored;
    if (find_trailer(fd, size, &stored) && stored.payload_bytes != expected) {
        return size_mismatch(stored.payload_bytes, expected);
    }
    return "stored shard is truncated or corrupt (" + std::to_string(size) + " bytes on disk, expected " +
           std::to_string(expected + kTrailerBytes) + ")";
}

std::string PosixStore::check_trailer(int fd, const uint8_t* raw, const ShardIO& item, size_t total,
                                      uint64_t checksum) const {
    Trailer trailer;
    std::string error = decode_trailer(raw, &trailer);
    if (!error.empty()) {
        std::string size_error = explain_size_mismatch(fd, total);
        return size_error.rfind(kSizeMismatch, 0) == 0 ? size_error : error;
    }
    return verify_trailer(trailer, item.id, item.shard, config_.num_shards, total, checksum);
}

std::string PosixStore::read_shard(int fd, const ShardIO& item) {
    // Read in pieces and verify each while it is still in the CPU cache; the trailer comes with
    // the last piece, in the same system call.
    size_t total = item.total_bytes();
    uint8_t raw[kTrailerBytes];
    Checksum checksum;
    off_t offset = 0;
    for (PieceCursor cursor(item.buffers); !cursor.done();) {
        std::vector<iovec> piece = cursor.next(kPieceBytes);
        size_t payload_iovs = piece.size();
        size_t want = 0;
        for (const iovec& v : piece) want += v.iov_len;
        size_t piece_bytes = want;
        if (cursor.done()) {
            piece.push_back({raw, kTrailerBytes});
            want += kTrailerBytes;
        }
        ssize_t n = transfer_all(fd, piece, offset, false);
        if (n < 0) return "read failed: " + errno_text(static_cast<int>(-n));
        if (static_cast<size_t>(n) != want) return explain_size_mismatch(fd, total);
        for (size_t i = 0; i < payload_iovs; ++i) checksum.update(piece[i].iov_base, piece[i].iov_len);
        offset += static_cast<off_t>(piece_bytes);
    }
    return check_trailer(fd, raw, item, total, checksum.finish());
}

std::string PosixStore::read_shard_to_sink(int fd, const ShardIO& item) {
    // Each piece goes through a per-thread buffer small enough to stay in the CPU cache: read
    // into it, checksum it, hand it to the sink. The trailer comes with the last piece.
    size_t total = item.sink_bytes;
    size_t piece = sink_piece_bytes(*item.sink, kPieceBytes);
    uint8_t* bounce = direct_staging(std::min(piece, total) + kTrailerBytes);
    if (bounce == nullptr) return "out of memory for a read buffer";
    uint8_t raw[kTrailerBytes];
    Checksum checksum;
    size_t offset = 0;
    do {
        size_t take = std::min(piece, total - offset);
        bool last = offset + take == total;
        size_t want = take + (last ? kTrailerBytes : 0);
        ssize_t n = transfer_all(fd, {{bounce, want}}, static_cast<off_t>(offset), false);
        if (n < 0) return "read failed: " + errno_text(static_cast<int>(-n));
        if (static_cast<size_t>(n) != want) return explain_size_mismatch(fd, total);
        checksum.update(bounce, take);
        if (last) std::memcpy(raw, bounce + take, kTrailerBytes);
        item.sink->consume(item.sink_item, offset, bounce, take);
        offset += take;
    } while (offset < total);
    return check_trailer(fd, raw, item, total, checksum.finish());
}

std::string PosixStore::read_shard_direct(int fd, const ShardIO& item) {
    size_t total = item.total_bytes();
    size_t file_bytes = align_up(total + kTrailerBytes, kDirectAlign);
    uint8_t* staging = direct_staging(file_bytes);
    if (staging == nullptr) return "out of memory for a direct I/O staging buffer";
    ssize_t n = transfer_all(fd, {{staging, file_bytes}}, 0, false);
    if (n < 0) return "read failed: " + errno_text(static_cast<int>(-n));
    if (static_cast<size_t>(n) < total + kTrailerBytes) return explain_size_mismatch(fd, total);
    std::string error = check_trailer(fd, staging + total, item, total, Checksum::of(staging, total));
    if (!error.empty()) return error;
    if (item.sink != nullptr) {
        item.sink->consume(item.sink_item, 0, staging, total);
        return {};
    }
    size_t offset = 0;
    for (const Buffer& b : item.buffers) {
        std::memcpy(b.data, staging + offset, b.size);
        offset += b.size;
    }
    return {};
}

// ---- prefetch and remove -------------------------------------------------------------------

void PosixStore::prefetch(const std::vector<std::string>& ids) {
    auto shared = std::make_shared<std::vector<std::string>>(ids);
    pool_.for_ranges(shared->size(), pool_.size(), [this, shared](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i) {
            for (uint32_t shard = 0; shard < config_.num_shards; ++shard) {
                FdGuard fd{::openat(blocks_fd_, shard_path((*shared)[i], shard).c_str(), O_RDONLY | O_CLOEXEC)};
                if (fd.fd >= 0) ::posix_fadvise(fd.fd, 0, 0, POSIX_FADV_WILLNEED);
            }
        }
    });
}

void PosixStore::remove(const std::vector<std::string>& ids) {
    for (const std::string& id : ids) {
        if (tier_) tier_->invalidate(id, config_.num_shards);
        // Hide the block first, so no reader sees it with shards missing.
        ::unlinkat(blocks_fd_, visible_path(id).c_str(), 0);
        if (config_.num_shards > 1) {
            for (uint32_t shard = 0; shard < config_.num_shards; ++shard) {
                ::unlinkat(blocks_fd_, shard_path(id, shard).c_str(), 0);
            }
        }
    }
}

// ---- capacity ------------------------------------------------------------------------------

void PosixStore::note_written(uint64_t bytes) {
    if (config_.capacity_bytes == 0) return;
    uint64_t total = written_since_evict_.fetch_add(bytes) + bytes;
    if (total >= std::max<uint64_t>(config_.capacity_bytes / 20, 1)) {
        written_since_evict_.store(0);
        {
            std::lock_guard<std::mutex> lock(evict_mutex_);
            evict_requested_ = true;
        }
        evict_cv_.notify_one();
    }
}

void PosixStore::evictor_loop() {
    std::unique_lock<std::mutex> lock(evict_mutex_);
    for (;;) {
        evict_cv_.wait(lock, [this] { return stopping_ || evict_requested_; });
        if (stopping_) return;
        evict_requested_ = false;
        lock.unlock();
        evict_pass(true, false);
        lock.lock();
    }
}

uint64_t PosixStore::evict_now() { return evict_pass(true, true); }

bool PosixStore::tmp_is_abandoned(const std::string& name, int64_t mtime_s) const {
    if (static_cast<int64_t>(std::time(nullptr)) - mtime_s > kTmpGraceSeconds) return true;
    // .tmp.<host hash>.<pid>.<seq>: a writer on this host whose process is gone left it.
    unsigned long long host = 0;
    int pid = 0;
    if (std::sscanf(name.c_str(), ".tmp.%16llx.%d.", &host, &pid) != 2) return false;
    if (host != host_hash() || pid == ::getpid()) return false;
    return ::kill(pid, 0) != 0 && errno == ESRCH;
}

bool PosixStore::loaded_since(const std::vector<std::string>& files, int64_t since_ns) const {
    for (const std::string& file : files) {
        struct stat st;
        if (::fstatat(blocks_fd_, file.c_str(), &st, 0) == 0 && mtime_ns(st) > since_ns) {
            return true;
        }
    }
    return false;
}

bool PosixStore::take_lease() {
    int fd = ::openat(root_fd_, kLease, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        struct stat st;
        bool stale = ::fstatat(root_fd_, kLease, &st, 0) == 0 &&
                     static_cast<int64_t>(std::time(nullptr)) - st.st_mtim.tv_sec > kLeaseSeconds;
        if (!stale) return false;  // another process is evicting right now
        ::unlinkat(root_fd_, kLease, 0);
        fd = ::openat(root_fd_, kLease, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0) return false;
    }
    ::close(fd);
    return true;
}

uint64_t PosixStore::evict_pass(bool take, bool wait_for_lease) {
    // One evictor at a time: two would each remove enough for the capacity.
    while (take && !take_lease()) {
        if (!wait_for_lease) return 0;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }

    struct BlockFiles {
        uint64_t bytes = 0;
        int64_t mtime_ns = 0;
        std::vector<std::string> files;  // the commit file first
    };
    std::unordered_map<std::string, BlockFiles> blocks;
    uint64_t total = 0;
    uint64_t freed = 0;
    for_each_file([&](const std::string& path, const std::string& name, const struct stat& st) {
        if (name.rfind(".tmp.", 0) == 0) {
            if (tmp_is_abandoned(name, st.st_mtim.tv_sec) && ::unlinkat(blocks_fd_, path.c_str(), 0) == 0) {
                freed += static_cast<uint64_t>(st.st_size);
            }
            return;
        }
        std::string base = path.substr(0, path.find('.', 4));
        BlockFiles& block = blocks[base];
        block.bytes += static_cast<uint64_t>(st.st_size);
        block.mtime_ns = std::max<int64_t>(block.mtime_ns, mtime_ns(st));
        bool commit_file = path == base || ends_with(path, ".ok");
        if (commit_file) {
            block.files.insert(block.files.begin(), path);
        } else {
            block.files.push_back(path);
        }
        total += static_cast<uint64_t>(st.st_size);
    });

    if (config_.capacity_bytes > 0 && total > config_.capacity_bytes) {
        std::vector<std::pair<int64_t, const std::string*>> order;
        order.reserve(blocks.size());
        for (const auto& [base, block] : blocks) order.emplace_back(block.mtime_ns, &base);
        std::sort(order.begin(), order.end());
        uint64_t target = static_cast<uint64_t>(static_cast<double>(config_.capacity_bytes) * kEvictTarget);
        for (const auto& [mtime, base] : order) {
            if (total <= target) break;
            const BlockFiles& block = blocks[*base];
            if (loaded_since(block.files, mtime)) continue;  // used while we were scanning: keep it
            for (const std::string& file : block.files) ::unlinkat(blocks_fd_, file.c_str(), 0);
            total -= block.bytes;
            freed += block.bytes;
        }
    }
    if (take) ::unlinkat(root_fd_, kLease, 0);
    return freed;
}

void PosixStore::for_each_file(
    const std::function<void(const std::string&, const std::string&, const struct stat&)>& visit,
    bool create_missing, const std::atomic<bool>* stop) const {
    for (size_t d = 0; d < kDirCount && !(stop != nullptr && stop->load()); ++d) {
        char dir[8];
        std::snprintf(dir, sizeof(dir), "%03zx", d);
        int dfd = ::openat(blocks_fd_, dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0) {
            if (create_missing && errno == ENOENT) ::mkdirat(blocks_fd_, dir, 0755);  // empty: nothing to visit
            continue;
        }
        DIR* listing = ::fdopendir(dfd);
        if (listing == nullptr) {
            ::close(dfd);
            continue;
        }
        while (struct dirent* entry = ::readdir(listing)) {
            std::string name = entry->d_name;
            if (name == "." || name == "..") continue;
            struct stat st;
            if (::fstatat(dfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
            visit(std::string(dir) + "/" + name, name, st);
        }
        ::closedir(listing);
    }
}

// ---- prewarm -------------------------------------------------------------------------------

void PosixStore::prewarm(uint64_t budget_bytes, int shard) {
    std::lock_guard<std::mutex> guard(close_mutex_);
    if (closed_ || budget_bytes == 0 || prewarm_running_.load()) return;  // one at a time
    if (prewarmer_.joinable()) prewarmer_.join();
    prewarm_files_.store(0);
    prewarm_bytes_.store(0);
    prewarm_seconds_.store(0);
    prewarm_running_.store(true);
    prewarmer_ = std::thread([this, budget_bytes, shard] { prewarm_loop(budget_bytes, shard); });
}

PrewarmStats PosixStore::prewarm_stats() const {
    // Atomics, not a lock: the prewarm thread runs at the lowest priority and must never hold up a
    // caller by being preempted while holding a lock.
    return {prewarm_running_.load(), prewarm_files_.load(), prewarm_bytes_.load(), prewarm_seconds_.load()};
}

void PosixStore::prewarm_loop(uint64_t budget_bytes, int shard) {
    // Background work: the lowest CPU priority, so a request's load or compute always runs first.
    name_this_thread("ucm-prewarm");
    make_this_thread_background();
    auto started = std::chrono::steady_clock::now();
    auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(); };

    // The shard files of this store's blocks, most recently used first (recency is the mtime, as
    // for eviction). Commit markers and other shards' files are left out, and so are files written
    // or loaded after the pass began: an engine saved or read them just now, so they are in memory
    // already (a new store's pass, which makes directories, can take seconds while the engine runs).
    // Fan-out directories that do not exist yet (a new store) are created on the way: otherwise the
    // first save into each pays for it, and on a disk filesystem a mkdir can cost as much as
    // writing the chunk.
    struct timespec now {};
    ::clock_gettime(CLOCK_REALTIME, &now);
    const int64_t began_ns = now.tv_sec * 1000000000LL + now.tv_nsec;
    std::string suffix = config_.num_shards > 1 && shard >= 0 ? "." + std::to_string(shard) : "";
    std::vector<std::pair<int64_t, std::string>> files;
    for_each_file([&](const std::string& path, const std::string& name, const struct stat& st) {
        int64_t mtime = mtime_ns(st);
        if (name.rfind(".tmp.", 0) == 0 || st.st_size == 0 || mtime > began_ns) return;
        if (config_.num_shards > 1) {
            if (ends_with(path, ".ok") || (!suffix.empty() && !ends_with(path, suffix))) return;
        }
        files.emplace_back(mtime, path);
    }, /*create_missing=*/true, &prewarm_stop_);
    std::sort(files.begin(), files.end(), std::greater<>());

    // Reading (rather than read-ahead advice) also marks pages already cached as recently used, so
    // the kernel keeps them as long as the pages just read. With the shared tier, each file is
    // copied into it instead (and so read too), unless the tier holds that file already.
    std::vector<uint8_t> buffer(1 << 20);
    uint64_t done_files = 0;
    uint64_t done_bytes = 0;
    for (const auto& [mtime, path] : files) {
        if (done_bytes >= budget_bytes || prewarm_stop_.load()) break;
        uint64_t bytes = 0;
        if (tier_) {
            bytes = fill_tier(path);
            if (bytes == 0) continue;  // removed meanwhile
        } else {
            FdGuard fd{::openat(blocks_fd_, path.c_str(), O_RDONLY | O_CLOEXEC)};
            if (fd.fd < 0) continue;  // removed meanwhile
            off_t offset = 0;
            for (;;) {
                ssize_t n = ::pread(fd.fd, buffer.data(), buffer.size(), offset);
                if (n <= 0) break;
                offset += n;
            }
            bytes = static_cast<uint64_t>(offset);
        }
        done_files += 1;
        done_bytes += bytes;
        prewarm_files_.store(done_files);
        prewarm_bytes_.store(done_bytes);
        prewarm_seconds_.store(elapsed());
    }
    prewarm_seconds_.store(elapsed());
    prewarm_running_.store(false);
}

// ---- shared tier ---------------------------------------------------------------------------

uint64_t PosixStore::fill_tier(const std::string& path) {
    // Read the whole file, verify its trailer and checksum, and copy it into the tier unless the
    // tier holds this very file already. Runs on background threads only.
    FdGuard fd{::openat(blocks_fd_, path.c_str(), O_RDONLY | O_CLOEXEC)};
    FileFacts facts;
    if (fd.fd < 0 || !file_facts(fd.fd, "", AT_EMPTY_PATH, &facts)) return 0;
    size_t size = static_cast<size_t>(facts.size);
    Trailer trailer;
    if (!find_trailer(fd.fd, size, &trailer) || trailer.num_shards != config_.num_shards) {
        return size;  // a load of it reports what is wrong
    }
    const FileIdentity& file = facts.identity;
    if (tier_->contains(trailer.id, trailer.shard, trailer.payload_bytes, file)) return size;
    uint8_t* data = direct_staging(size);
    if (data == nullptr) return size;
    if (transfer_all(fd.fd, {{data, size}}, 0, false) != static_cast<ssize_t>(size)) return size;
    if (Checksum::of(data, trailer.payload_bytes) != trailer.checksum) return size;
    tier_->write(trailer.id, trailer.shard, {{data, trailer.payload_bytes}}, trailer.checksum, file);
    return size;
}

void PosixStore::queue_fill(const std::string& path) {
    std::lock_guard<std::mutex> lock(fill_mutex_);
    if (fill_stopping_ || fill_queue_.size() >= kMaxFillQueue) return;  // a later load queues it again
    fill_queue_.push_back(path);
    fill_cv_.notify_all();
}

void PosixStore::wait_fills() {
    std::unique_lock<std::mutex> lock(fill_mutex_);
    fill_cv_.wait(lock, [this] { return fill_stopping_ || (fill_queue_.empty() && !fill_busy_); });
}

void PosixStore::fill_loop() {
    name_this_thread("ucm-tier-fill");
    make_this_thread_background();
    std::unique_lock<std::mutex> lock(fill_mutex_);
    for (;;) {
        fill_cv_.wait(lock, [this] { return fill_stopping_ || !fill_queue_.empty(); });
        if (fill_stopping_) return;
        std::vector<std::string> paths;
        paths.swap(fill_queue_);
        fill_busy_ = true;
        lock.unlock();
        size_t done = 0;
        for (; done < paths.size() && !fill_stopping_; ++done) fill_tier(paths[done]);
        lock.lock();
        // Closing: what is left goes back to the queue, which close() copies (within its bound).
        fill_queue_.insert(fill_queue_.begin(), paths.begin() + static_cast<std::ptrdiff_t>(done), paths.end());
        fill_busy_ = false;
        fill_cv_.notify_all();
    }
}

SharedTierStats PosixStore::shared_memory_stats() {
    return tier_ ? tier_->stats() : SharedTierStats{};
}

uint64_t PosixStore::shared_memory_hits() const { return tier_ ? tier_->hits() : 0; }

}  // namespace ucm
