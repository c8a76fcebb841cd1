// A host-memory tier that every process of one host shares: fixed-size slots in a file on a
// memory filesystem (/dev/shm by default), mapped by each process. The posix store keeps a copy of
// the shards it writes there and serves loads from it, so a process that starts after another one
// saved a prompt copies the bytes from memory instead of reading files.
//
// One arena file per shard size, holding a header, a table of slot headers, and the slots:
//
//   offset 0            header (4096 bytes, little-endian):
//     0   u64  magic "UCMTIER1"
//     8   u32  format version (1)
//     12  u32  ways (slots per set)
//     16  u64  payload bytes of every slot
//     24  u64  slot count (a multiple of ways)
//     32  u64  slot stride (payload bytes rounded up to 4096)
//     40  u64  offset of the slot table (4096)
//     48  u64  offset of the first slot (table end, rounded up to 4096)
//     56  u64  checksum of header bytes 0..55
//   table               128 bytes per slot (SlotHeader in shared_tier.cc)
//   slots               slot i at first-slot offset + i * stride
//
// A shard lives in the set its key (id, shard) hashes to, in any of the set's ways. A slot's
// sequence count is odd while a writer owns it: a writer moves it from even to odd with a
// compare-and-swap, fills the slot, and publishes by moving it to the next even value. A reader
// copies the payload while checksumming it, then re-reads the count: a count that moved means a
// writer overwrote the slot meanwhile, and the read fails (the caller reads the file instead). A
// slot also names the file (inode, device, size, birth time) its bytes were copied from; the caller serves it only
// while that file is still the store's file for the shard, so the tier never outlives or
// contradicts the store. A writer that died while owning a slot leaves it odd: after
// kStaleClaimSeconds another writer takes it over.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "buffer.h"

namespace ucm {

// The identity of the store file a slot's bytes were copied from: its inode number, and a stamp
// mixing its device, its size and its birth time where the filesystem records one (so an inode
// number reused by a later file, or a file damaged in place to another size, does not match).
struct FileIdentity {
    uint64_t ino = 0;
    uint64_t stamp = 0;
};

struct SharedTierStats {
    uint64_t hits = 0;       // loads served from the tier
    uint64_t misses = 0;     // loads of a shard the tier did not hold
    uint64_t stale = 0;      // the tier held a copy of a file the store no longer has
    uint64_t failed = 0;     // a writer overwrote the slot during the read, or its checksum was wrong
    uint64_t written = 0;    // shards copied into the tier
    uint64_t unwritten = 0;  // shards not copied: every slot of their set busy, or no memory left
    uint64_t arenas = 0;     // arena files mapped
    uint64_t slots = 0;      // slots of those arenas
    uint64_t filled = 0;     // slots holding a shard (counted when asked)
    uint64_t writing = 0;    // slots owned by a writer right now, or left so by a dead one
    std::string error;       // why an arena could not be opened, when one could not
};

class SharedTier {
   public:
    static constexpr int64_t kStaleClaimSeconds = 10;

    // `dir`: where the arena files live; `name`: their common prefix (one per store root);
    // `capacity_bytes`: the size of each arena's slots together. Opens the arenas already there
    // and starts mapping their filled slots in the background, so the first loads find them ready.
    SharedTier(std::string dir, std::string name, uint64_t capacity_bytes);
    ~SharedTier();
    SharedTier(const SharedTier&) = delete;
    SharedTier& operator=(const SharedTier&) = delete;

    // kUnavailable: no arena for shards of this size (it could not be opened, or too many sizes).
    enum class Read { kMiss, kHit, kStale, kFailed, kUnavailable };

    // Copies the slot holding (item.id, item.shard) into the item's buffers or sink, if one holds it
    // and was copied from `file`. On kFailed, what reached the sink is garbage (the caller reads the
    // file, which overwrites it); on kMiss and kStale nothing was copied.
    Read read(const ShardIO& item, const FileIdentity& file);

    // Copies a shard whose bytes are `payload` (in order) and whose checksum is `checksum` into a
    // slot, replacing any older copy of the same shard. Best effort: it gives up rather than wait.
    void write(const std::string& id, uint32_t shard, const std::vector<Buffer>& payload, uint64_t checksum,
               const FileIdentity& file);

    // Whether a slot holds a copy of `file` for (id, shard), of `payload_bytes` bytes.
    bool contains(const std::string& id, uint32_t shard, size_t payload_bytes, const FileIdentity& file);

    // Forgets every copy of the blocks' shards.
    void invalidate(const std::string& id, uint32_t num_shards);

    // Counters and a scan of every slot header (a few milliseconds for a full tier).
    SharedTierStats stats();
    // Loads served so far: one atomic read, for a caller that asks every step.
    uint64_t hits() const { return hits_.load(std::memory_order_relaxed); }
    void close();

   private:
    struct Arena;

    Arena* arena_for(size_t payload_bytes);  // opens or creates it; nullptr when that failed
    std::unique_ptr<Arena> open_arena(const std::string& path, size_t payload_bytes, bool create,
                                      std::string* error);
    void prefault(Arena* arena);

    std::string dir_;
    std::string name_;
    uint64_t capacity_bytes_;
    std::mutex mutex_;  // arenas_ and error_
    std::vector<std::unique_ptr<Arena>> arenas_;
    std::string error_;
    std::atomic<bool> stopping_{false};
    std::atomic<uint64_t> hits_{0}, misses_{0}, stale_{0}, failed_{0}, written_{0}, unwritten_{0};
};

}  // namespace ucm
