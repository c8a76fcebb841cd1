#include "shared_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "checksum.h"
#include "file_io.h"
#include "sink.h"
#include "thread_pool.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

namespace ucm {
namespace {

constexpr uint64_t kMagic = 0x31524549544d4355ULL;  // "UCMTIER1"
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 4096;
constexpr size_t kPage = 4096;
constexpr uint32_t kMaxWays = 8;
constexpr uint64_t kMaxSlots = 65536;      // bounds the slot table (8 MiB) for small shards
constexpr size_t kMaxArenas = 8;           // shard sizes per tier: one per model, dtype and chunk size in use
constexpr size_t kPieceBytes = 256 << 10;  // checksum a piece, then hand it on while it is in the CPU cache

// One slot's header in the shared table. Every field but the atomics is written only by the
// slot's owner (odd sequence count) and read by readers that check the count afterwards.
struct SlotHeader {
    std::atomic<uint64_t> seq;        // odd: owned by a writer
    uint64_t checksum;                // of the payload
    std::atomic<uint64_t> used_ms;    // last load or write (milliseconds since the epoch), for replacement
    std::atomic<uint64_t> claimed_s;  // when the current owner took the slot
    uint64_t ino;                     // the store file the payload was copied from (FileIdentity)
    uint64_t stamp;
    uint32_t shard;
    uint32_t id_len;  // 0: empty
    uint32_t writer_pid;
    uint32_t reserved;
    uint8_t id[kMaxIdBytes];
};
static_assert(sizeof(SlotHeader) == 128, "the slot table's layout is part of the arena format");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "slots are shared between processes");

size_t align_up(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

uint64_t now_s() { return static_cast<uint64_t>(std::time(nullptr)); }

uint64_t now_ms() {
    struct timespec ts;
    ::clock_gettime(CLOCK_REALTIME, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1000000;
}

std::string errno_text(int err) { return std::strerror(err); }

void put64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
void put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
uint64_t get64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}
uint32_t get32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

uint64_t slot_hash(const std::string& id, uint32_t shard) {
    return hash_key(id.data(), id.size()) ^ (0x9e3779b97f4a7c15ULL * (static_cast<uint64_t>(shard) + 1));
}

bool holds(const SlotHeader& slot, const std::string& id, uint32_t shard) {
    return slot.id_len == id.size() && slot.shard == shard && std::memcmp(slot.id, id.data(), id.size()) == 0;
}

}  // namespace

struct SharedTier::Arena {
    std::string path;
    int fd = -1;
    uint8_t* base = nullptr;
    size_t map_bytes = 0;
    uint64_t payload_bytes = 0;
    uint64_t slots = 0;
    uint32_t ways = 1;
    uint64_t stride = 0;
    uint64_t data_offset = 0;
    std::thread prefaulter;

    SlotHeader* slot(uint64_t i) const { return reinterpret_cast<SlotHeader*>(base + kHeaderBytes) + i; }
    uint8_t* data(uint64_t i) const { return base + data_offset + i * stride; }
    uint64_t set_of(const std::string& id, uint32_t shard) const {
        return slot_hash(id, shard) % (slots / ways);
    }

    ~Arena() {
        if (prefaulter.joinable()) prefaulter.join();
        if (base != nullptr) ::munmap(base, map_bytes);
        if (fd >= 0) ::close(fd);
    }
};

SharedTier::SharedTier(std::string dir, std::string name, uint64_t capacity_bytes)
    : dir_(std::move(dir)), name_(std::move(name)), capacity_bytes_(capacity_bytes) {
    // Map the arenas other processes filled, each file named <name>-<payload bytes>.arena.
    DIR* listing = ::opendir(dir_.c_str());
    if (listing == nullptr) {
        error_ = "cannot open " + dir_ + ": " + errno_text(errno);
        return;
    }
    std::vector<size_t> sizes;
    std::string prefix = name_ + "-";
    while (struct dirent* entry = ::readdir(listing)) {
        std::string file = entry->d_name;
        unsigned long long payload = 0;
        char tail[16] = {};
        if (file.rfind(prefix, 0) != 0) continue;
        if (std::sscanf(file.c_str() + prefix.size(), "%llu.%15s", &payload, tail) == 2 &&
            std::strcmp(tail, "arena") == 0 && payload > 0) {
            sizes.push_back(payload);
        }
    }
    ::closedir(listing);
    for (size_t payload : sizes) arena_for(payload);
}

SharedTier::~SharedTier() { close(); }

void SharedTier::close() {
    stopping_.store(true);
    std::lock_guard<std::mutex> lock(mutex_);
    arenas_.clear();  // joins the prefault threads, unmaps
}

SharedTier::Arena* SharedTier::arena_for(size_t payload_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_.load()) return nullptr;
    for (const auto& arena : arenas_) {
        if (arena->payload_bytes == payload_bytes) return arena->base != nullptr ? arena.get() : nullptr;
    }
    if (arenas_.size() >= kMaxArenas) return nullptr;  // shards of further sizes bypass the tier
    std::string path = dir_ + "/" + name_ + "-" + std::to_string(payload_bytes) + ".arena";
    std::string error;
    std::unique_ptr<Arena> arena = open_arena(path, payload_bytes, true, &error);
    if (arena == nullptr) {
        // Remember the failure (an unmapped arena), so each load does not try again.
        arena = std::make_unique<Arena>();
        arena->payload_bytes = payload_bytes;
        error_ = error;
        arenas_.push_back(std::move(arena));
        return nullptr;
    }
    Arena* raw = arena.get();
    raw->prefaulter = std::thread([this, raw] { prefault(raw); });
    arenas_.push_back(std::move(arena));
    return raw;
}

std::unique_ptr<SharedTier::Arena> SharedTier::open_arena(const std::string& path, size_t payload_bytes,
                                                          bool create, std::string* error) {
    std::unique_ptr<Arena> arena;
    struct stat st;
    // One process initialises the file while holding its lock; the others wait, then read it. A
    // file that is not a valid arena is unlinked, never truncated: processes that still map it
    // would fault on the pages cut off.
    for (int attempt = 0;; ++attempt) {
        arena = std::make_unique<Arena>();
        arena->path = path;
        arena->payload_bytes = payload_bytes;
        arena->fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0600);
        if (arena->fd < 0) {
            *error = "cannot open " + path + ": " + errno_text(errno);
            return nullptr;
        }
        if (::flock(arena->fd, LOCK_EX) != 0) {
            *error = "cannot lock " + path + ": " + errno_text(errno);
            return nullptr;
        }
        struct stat named;
        if (::fstat(arena->fd, &st) != 0) {
            *error = "cannot stat " + path + ": " + errno_text(errno);
            return nullptr;
        }
        if (::stat(path.c_str(), &named) == 0 && named.st_ino == st.st_ino && named.st_dev == st.st_dev)
            break;
        if (attempt == 3) {
            *error = path + " keeps being replaced by other processes";
            return nullptr;
        }
        // Another process replaced the file while we waited for the lock: open the new one.
    }
    struct Unlock {
        int fd;
        ~Unlock() { ::flock(fd, LOCK_UN); }
    } unlock{arena->fd};

    uint8_t header[kHeaderBytes] = {};
    bool valid = false;
    if (static_cast<size_t>(st.st_size) >= kHeaderBytes &&
        ::pread(arena->fd, header, kHeaderBytes, 0) == static_cast<ssize_t>(kHeaderBytes)) {
        valid = get64(header) == kMagic && get32(header + 8) == kVersion &&
                get64(header + 16) == payload_bytes && get64(header + 56) == Checksum::of(header, 56);
        if (valid) {
            arena->ways = get32(header + 12);
            arena->slots = get64(header + 24);
            arena->stride = get64(header + 32);
            arena->data_offset = get64(header + 48);
            valid = arena->ways >= 1 && arena->ways <= kMaxWays && arena->slots % arena->ways == 0 &&
                    arena->slots > 0 && arena->stride == align_up(payload_bytes, kPage) &&
                    get64(header + 40) == kHeaderBytes &&
                    arena->data_offset == align_up(kHeaderBytes + arena->slots * sizeof(SlotHeader), kPage) &&
                    static_cast<uint64_t>(st.st_size) == arena->data_offset + arena->slots * arena->stride;
        }
    }
    if (!valid && st.st_size > 0) {
        // Not an arena of this format (damaged, or another version's): replace it.
        if (::unlink(path.c_str()) != 0) {
            *error = path + " is not a valid arena and cannot be removed: " + errno_text(errno);
            return nullptr;
        }
        return open_arena(path, payload_bytes, create, error);
    }
    if (!valid) {
        // A new file: lay it out.
        arena->stride = align_up(payload_bytes, kPage);
        arena->slots = std::clamp<uint64_t>(capacity_bytes_ / arena->stride, 1, kMaxSlots);
        arena->ways = static_cast<uint32_t>(std::min<uint64_t>(kMaxWays, arena->slots));
        arena->slots = arena->slots / arena->ways * arena->ways;
        arena->data_offset = align_up(kHeaderBytes + arena->slots * sizeof(SlotHeader), kPage);
        uint64_t file_bytes = arena->data_offset + arena->slots * arena->stride;
        // The slots stay holes until a writer allocates one (see write()); only the table is allocated.
        if (::ftruncate(arena->fd, static_cast<off_t>(file_bytes)) != 0) {
            *error = "cannot size " + path + ": " + errno_text(errno);
            return nullptr;
        }
        if (::fallocate(arena->fd, 0, 0, static_cast<off_t>(arena->data_offset)) != 0 &&
            errno != EOPNOTSUPP) {
            *error = "cannot allocate the slot table of " + path + ": " + errno_text(errno);
            return nullptr;
        }
        std::memset(header, 0, sizeof(header));
        put64(header, kMagic);
        put32(header + 8, kVersion);
        put32(header + 12, arena->ways);
        put64(header + 16, payload_bytes);
        put64(header + 24, arena->slots);
        put64(header + 32, arena->stride);
        put64(header + 40, kHeaderBytes);
        put64(header + 48, arena->data_offset);
        put64(header + 56, Checksum::of(header, 56));
        if (::pwrite(arena->fd, header, kHeaderBytes, 0) != static_cast<ssize_t>(kHeaderBytes)) {
            *error = "cannot write the header of " + path + ": " + errno_text(errno);
            return nullptr;
        }
    }
    arena->map_bytes = arena->data_offset + arena->slots * arena->stride;
    void* base = ::mmap(nullptr, arena->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, arena->fd, 0);
    if (base == MAP_FAILED) {
        *error = "cannot map " + path + ": " + errno_text(errno);
        return nullptr;
    }
    arena->base = static_cast<uint8_t*>(base);
    return arena;
}

void SharedTier::prefault(Arena* arena) {
    // Map the filled slots' pages into this process ahead of the first loads, at the lowest CPU
    // priority. Holes (slots never written) are left alone: touching them would allocate memory.
    name_this_thread("ucm-tier-map");
    make_this_thread_background();
    for (uint64_t i = 0; i < arena->slots && !stopping_.load(); ++i) {
        SlotHeader* slot = arena->slot(i);
        uint64_t seq = slot->seq.load(std::memory_order_acquire);
        if (seq == 0 || (seq & 1) != 0 || slot->id_len == 0) continue;
        if (::madvise(arena->data(i), arena->stride, MADV_POPULATE_READ) != 0) {
            volatile uint8_t sink = 0;  // kernels before 5.14: touch each page
            for (uint64_t off = 0; off < arena->stride; off += kPage) sink = sink + arena->data(i)[off];
        }
    }
}

SharedTier::Read SharedTier::read(const ShardIO& item, const FileIdentity& file) {
    size_t total = item.total_bytes();
    Arena* arena = total > 0 ? arena_for(total) : nullptr;
    if (arena == nullptr) {
        misses_.fetch_add(1, std::memory_order_relaxed);
        return Read::kUnavailable;
    }
    uint64_t first = arena->set_of(item.id, item.shard) * arena->ways;
    bool saw_stale = false;
    for (uint64_t i = first; i < first + arena->ways; ++i) {
        SlotHeader* slot = arena->slot(i);
        uint64_t seq = slot->seq.load(std::memory_order_acquire);
        if (seq == 0 || (seq & 1) != 0 || !holds(*slot, item.id, item.shard)) continue;
        if (slot->ino != file.ino || slot->stamp != file.stamp) {
            saw_stale = true;
            continue;
        }
        uint64_t expected = slot->checksum;
        const uint8_t* src = arena->data(i);
        Checksum checksum;
        if (item.sink != nullptr) {
            size_t piece = sink_piece_bytes(*item.sink, kPieceBytes);
            for (size_t offset = 0; offset < total; offset += piece) {
                size_t take = std::min(piece, total - offset);
                checksum.update(src + offset, take);
                item.sink->consume(item.sink_item, offset, src + offset, take);
            }
        } else {
            size_t offset = 0;
            for (const Buffer& b : item.buffers) {
                // Piece by piece: each piece is checksummed while it is still in the CPU cache.
                for (size_t done = 0; done < b.size; done += kPieceBytes) {
                    size_t take = std::min(kPieceBytes, b.size - done);
                    std::memcpy(b.data + done, src + offset + done, take);
                    checksum.update(b.data + done, take);
                }
                offset += b.size;
            }
        }
        std::atomic_thread_fence(std::memory_order_acquire);
        bool unchanged = slot->seq.load(std::memory_order_relaxed) == seq;
        if (unchanged && checksum.finish() == expected) {
            slot->used_ms.store(now_ms(), std::memory_order_relaxed);
            hits_.fetch_add(1, std::memory_order_relaxed);
            return Read::kHit;
        }
        if (unchanged) {
            // Damaged bytes: empty the slot, unless a writer takes it first.
            if (slot->seq.compare_exchange_strong(seq, seq + 1, std::memory_order_acq_rel)) {
                slot->id_len = 0;
                uint64_t owned = seq + 1;
                slot->seq.compare_exchange_strong(owned, owned + 1, std::memory_order_release);
            }
        }
        failed_.fetch_add(1, std::memory_order_relaxed);
        return Read::kFailed;
    }
    if (saw_stale) {
        stale_.fetch_add(1, std::memory_order_relaxed);
        return Read::kStale;
    }
    misses_.fetch_add(1, std::memory_order_relaxed);
    return Read::kMiss;
}

void SharedTier::write(const std::string& id, uint32_t shard, const std::vector<Buffer>& payload,
                       uint64_t checksum, const FileIdentity& file) {
    size_t total = 0;
    for (const Buffer& b : payload) total += b.size;
    Arena* arena = total > 0 && id.size() <= kMaxIdBytes ? arena_for(total) : nullptr;
    if (arena == nullptr) {
        unwritten_.fetch_add(1, std::memory_order_relaxed);
        return;
    }
    uint64_t first = arena->set_of(id, shard) * arena->ways;
    uint64_t now = now_s();
    for (int attempt = 0; attempt < 2; ++attempt) {
        // Pick a slot: one holding this shard already (so one copy, the newest, remains), an
        // empty one, one a dead writer left owned, or else the least recently used.
        uint64_t pick = first + arena->ways;
        uint64_t pick_seq = 0;
        int pick_rank = 4;
        uint64_t pick_used = UINT64_MAX;
        for (uint64_t i = first; i < first + arena->ways; ++i) {
            SlotHeader* slot = arena->slot(i);
            uint64_t seq = slot->seq.load(std::memory_order_acquire);
            int rank;
            uint64_t used = 0;
            if ((seq & 1) != 0) {
                if (now < slot->claimed_s.load(std::memory_order_relaxed) + kStaleClaimSeconds) continue;
                rank = 2;
            } else if (slot->id_len == 0) {
                rank = 1;
            } else if (holds(*slot, id, shard)) {
                rank = 0;
            } else {
                rank = 3;
                used = slot->used_ms.load(std::memory_order_relaxed);
            }
            if (rank < pick_rank || (rank == pick_rank && used < pick_used)) {
                pick = i;
                pick_seq = seq;
                pick_rank = rank;
                pick_used = used;
            }
        }
        if (pick == first + arena->ways) break;  // every slot is being written right now
        SlotHeader* slot = arena->slot(pick);
        // Taking over from a dead writer keeps the count odd; otherwise it becomes odd.
        uint64_t owned = pick_seq + ((pick_seq & 1) != 0 ? 2 : 1);
        if (!slot->seq.compare_exchange_strong(pick_seq, owned, std::memory_order_acq_rel)) continue;
        slot->claimed_s.store(now, std::memory_order_relaxed);
        slot->writer_pid = static_cast<uint32_t>(::getpid());
        slot->id_len = 0;
        // The payload goes in through the file, not the mapping: the kernel allocates the pages
        // as it copies (no page fault per page, no zeroing of pages about to be overwritten), and
        // a full memory filesystem fails the write instead of killing the process (SIGBUS).
        off_t offset = static_cast<off_t>(arena->data_offset + pick * arena->stride);
        std::vector<iovec> iov;
        iov.reserve(payload.size());
        for (const Buffer& b : payload) iov.push_back({b.data, b.size});
        bool room = transfer_all(arena->fd, std::move(iov), offset, true) == static_cast<ssize_t>(total);
        if (room) {
            slot->checksum = checksum;
            slot->ino = file.ino;
            slot->stamp = file.stamp;
            slot->shard = shard;
            std::memcpy(slot->id, id.data(), id.size());
            slot->id_len = static_cast<uint32_t>(id.size());
            slot->used_ms.store(now_ms(), std::memory_order_relaxed);
        }
        // Publish, unless another writer took the slot over meanwhile (it then owns it).
        uint64_t expected = owned;
        slot->seq.compare_exchange_strong(expected, owned + 1, std::memory_order_release);
        if (room) {
            written_.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        break;
    }
    unwritten_.fetch_add(1, std::memory_order_relaxed);
}

bool SharedTier::contains(const std::string& id, uint32_t shard, size_t payload_bytes,
                          const FileIdentity& file) {
    Arena* arena = payload_bytes > 0 ? arena_for(payload_bytes) : nullptr;
    if (arena == nullptr) return false;
    uint64_t first = arena->set_of(id, shard) * arena->ways;
    for (uint64_t i = first; i < first + arena->ways; ++i) {
        SlotHeader* slot = arena->slot(i);
        uint64_t seq = slot->seq.load(std::memory_order_acquire);
        if (seq != 0 && (seq & 1) == 0 && holds(*slot, id, shard) && slot->ino == file.ino &&
            slot->stamp == file.stamp) {
            return true;
        }
    }
    return false;
}

void SharedTier::invalidate(const std::string& id, uint32_t num_shards) {
    std::vector<Arena*> arenas;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& arena : arenas_) {
            if (arena->base != nullptr) arenas.push_back(arena.get());
        }
    }
    for (Arena* arena : arenas) {
        for (uint32_t shard = 0; shard < num_shards; ++shard) {
            uint64_t first = arena->set_of(id, shard) * arena->ways;
            for (uint64_t i = first; i < first + arena->ways; ++i) {
                SlotHeader* slot = arena->slot(i);
                uint64_t seq = slot->seq.load(std::memory_order_acquire);
                if ((seq & 1) != 0 || !holds(*slot, id, shard)) continue;
                if (slot->seq.compare_exchange_strong(seq, seq + 1, std::memory_order_acq_rel)) {
                    slot->id_len = 0;
                    uint64_t owned = seq + 1;
                    slot->seq.compare_exchange_strong(owned, owned + 1, std::memory_order_release);
                }
            }
        }
    }
}

SharedTierStats SharedTier::stats() {
    SharedTierStats out;
    out.hits = hits_.load();
    out.misses = misses_.load();
    out.stale = stale_.load();
    out.failed = failed_.load();
    out.written = written_.load();
    out.unwritten = unwritten_.load();
    std::lock_guard<std::mutex> lock(mutex_);
    out.error = error_;
    for (const auto& arena : arenas_) {
        if (arena->base == nullptr) continue;
        out.arenas += 1;
        out.slots += arena->slots;
        for (uint64_t i = 0; i < arena->slots; ++i) {
            const SlotHeader* slot = arena->slot(i);
            uint64_t seq = slot->seq.load(std::memory_order_relaxed);
            if ((seq & 1) != 0) {
                out.writing += 1;
            } else if (seq != 0 && slot->id_len != 0) {
                out.filled += 1;
            }
        }
    }
    return out;
}

}  // namespace ucm
