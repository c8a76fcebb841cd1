#include "block_format.h"

#include <cstring>
#include <string>

#include "checksum.h"

namespace ucm {
namespace {

constexpr char kMagic[8] = {'U', 'C', 'M', 'S', 'H', 'A', 'R', 'D'};

template <typename T>
void put(uint8_t* out, size_t offset, T value) {
    std::memcpy(out + offset, &value, sizeof(T));  // the supported hosts are little-endian
}

template <typename T>
T get(const uint8_t* in, size_t offset) {
    T value;
    std::memcpy(&value, in + offset, sizeof(T));
    return value;
}

}  // namespace

void encode_trailer(const Trailer& trailer, uint8_t out[kTrailerBytes]) {
    std::memset(out, 0, kTrailerBytes);
    std::memcpy(out, kMagic, sizeof(kMagic));
    put<uint32_t>(out, 8, kFormatVersion);
    put<uint64_t>(out, 16, trailer.payload_bytes);
    put<uint64_t>(out, 24, trailer.checksum);
    put<uint32_t>(out, 32, trailer.shard);
    put<uint32_t>(out, 36, trailer.num_shards);
    put<uint32_t>(out, 40, static_cast<uint32_t>(trailer.id.size()));
    std::memcpy(out + 48, trailer.id.data(), trailer.id.size());
    put<uint64_t>(out, 120, Checksum::of(out, 120));
}

std::string decode_trailer(const uint8_t in[kTrailerBytes], Trailer* trailer) {
    if (std::memcmp(in, kMagic, sizeof(kMagic)) != 0) return "no shard trailer where the buffers end";
    if (get<uint64_t>(in, 120) != Checksum::of(in, 120)) return "shard trailer is corrupt";
    uint32_t version = get<uint32_t>(in, 8);
    if (version != kFormatVersion) return "unsupported shard format version " + std::to_string(version);
    uint32_t id_size = get<uint32_t>(in, 40);
    if (id_size == 0 || id_size > 64) return "shard trailer has an invalid id length";
    trailer->payload_bytes = get<uint64_t>(in, 16);
    trailer->checksum = get<uint64_t>(in, 24);
    trailer->shard = get<uint32_t>(in, 32);
    trailer->num_shards = get<uint32_t>(in, 36);
    trailer->id.assign(reinterpret_cast<const char*>(in + 48), id_size);
    return {};
}

const char kSizeMismatchPrefix[] = "stored shard holds ";

std::string size_mismatch(uint64_t stored_bytes, uint64_t buffer_bytes) {
    return kSizeMismatchPrefix + std::to_string(stored_bytes) + " bytes but the buffers hold " +
           std::to_string(buffer_bytes);
}

std::string verify_trailer(const Trailer& trailer, const std::string& id, uint32_t shard, uint32_t num_shards,
                           uint64_t payload_bytes, uint64_t checksum) {
    if (trailer.id != id || trailer.shard != shard || trailer.num_shards != num_shards) {
        return "stored shard belongs to another block or shard";
    }
    if (trailer.payload_bytes != payload_bytes) return size_mismatch(trailer.payload_bytes, payload_bytes);
    if (trailer.checksum != checksum) return "checksum mismatch: the stored bytes are corrupt";
    return {};
}

}  // namespace ucm
