#include "redis_store.h"

#include <algorithm>
#include <array>
#include <functional>
#include <stdexcept>

#include "block_format.h"
#include "checksum.h"
#include "sink.h"

namespace ucm {

namespace {

constexpr size_t kPieceBytes = 256 << 10;  // payload read and checksummed per step (stays in L2)
constexpr size_t kLookupBatch = 4096;      // commands per pipeline of a lookup
const char kCrlf[] = "\r\n";

std::vector<std::string> all(size_t count, const std::string& error) { return std::vector<std::string>(count, error); }

}  // namespace

RedisStore::RedisStore(RedisStoreConfig config) : config_(std::move(config)), pool_(std::max<size_t>(1, config_.threads)) {
    if (config_.num_shards == 0) throw std::invalid_argument("num_shards must be at least 1");
    auto connection = acquire();
    std::string error = connection->ensure();
    if (!error.empty()) {
        pool_.shutdown();
        throw std::runtime_error(error);
    }
    release(std::move(connection));
}

RedisStore::~RedisStore() { close(); }

void RedisStore::close() {
    pool_.shutdown();
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.clear();
}

std::unique_ptr<RedisConnection> RedisStore::acquire() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!idle_.empty()) {
            auto connection = std::move(idle_.back());
            idle_.pop_back();
            return connection;
        }
    }
    return std::make_unique<RedisConnection>(config_.endpoint);
}

void RedisStore::release(std::unique_ptr<RedisConnection> connection) {
    if (!connection->is_open()) return;  // it failed: the next user connects afresh
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(std::move(connection));
}

std::string RedisStore::for_each_key(const std::vector<std::string>& ids, const char* command,
                                     const std::function<void(size_t, const RedisReply&)>& on_reply) {
    auto connection = acquire();
    std::string failure = connection->ensure();
    for (size_t first = 0; failure.empty() && first < ids.size(); first += kLookupBatch) {
        size_t last = std::min(ids.size(), first + kLookupBatch);
        std::string commands;
        for (size_t i = first; i < last; ++i) RedisConnection::append_command(commands, {command, key_of(ids[i])});
        failure = connection->send({{commands.data(), commands.size()}});
        for (size_t i = first; failure.empty() && i < last; ++i) {
            RedisReply reply;
            failure = connection->read_reply(&reply);
            if (!failure.empty()) break;
            if (reply.type == '-') {
                failure = std::string("redis refused ") + command + ": " + reply.text;
                connection->close();  // replies of this pipeline are still coming
                break;
            }
            on_reply(i, reply);
        }
    }
    release(std::move(connection));
    return failure;
}

std::vector<uint8_t> RedisStore::lookup(const std::vector<std::string>& ids, std::string* error) {
    std::vector<uint8_t> found(ids.size(), 0);
    std::string failure = for_each_key(ids, "HLEN", [&](size_t i, const RedisReply& reply) {
        found[i] = reply.type == ':' && reply.integer >= static_cast<int64_t>(config_.num_shards);
    });
    if (!failure.empty()) {
        std::fill(found.begin(), found.end(), 0);
        if (error != nullptr) *error = failure;
    }
    return found;
}

size_t RedisStore::lookup_prefix(const std::vector<std::string>& ids, std::string* error) {
    std::vector<uint8_t> found = lookup(ids, error);
    return static_cast<size_t>(std::find(found.begin(), found.end(), 0) - found.begin());
}

TaskPtr RedisStore::in_ranges(std::vector<ShardIO> items, RangeWork work) {
    auto task = std::make_shared<Task>(items.size());
    auto shared = std::make_shared<std::vector<ShardIO>>(std::move(items));
    pool_.for_ranges(shared->size(), pool_.size(), [this, task, shared, work](size_t begin, size_t end) {
        std::vector<std::string> errors = (this->*work)(*shared, begin, end);
        for (size_t i = begin; i < end; ++i) task->finish(i, (*shared)[i].id, std::move(errors[i - begin]));
    });
    return task;
}

TaskPtr RedisStore::dump(std::vector<ShardIO> items) { return in_ranges(std::move(items), &RedisStore::dump_range); }

TaskPtr RedisStore::load(std::vector<ShardIO> items) { return in_ranges(std::move(items), &RedisStore::load_range); }

namespace {

// Splits items [0, count) into windows of about kWindowBytes of values. A range is sent one window
// ahead of the replies being read, so the server holds at most two windows of requests or replies
// for this connection instead of the whole range.
std::vector<std::pair<size_t, size_t>> windows(const std::vector<ShardIO>& items, size_t begin, size_t end) {
    constexpr size_t kWindowBytes = 4 << 20;
    constexpr size_t kWindowItems = 512;
    std::vector<std::pair<size_t, size_t>> out;
    size_t first = 0;
    size_t bytes = 0;
    for (size_t k = 0; k < end - begin; ++k) {
        bytes += items[begin + k].total_bytes() + kTrailerBytes;
        if (bytes >= kWindowBytes || k + 1 - first >= kWindowItems) {
            out.emplace_back(first, k + 1);
            first = k + 1;
            bytes = 0;
        }
    }
    if (first < end - begin) out.emplace_back(first, end - begin);
    return out;
}

}  // namespace

std::vector<std::string> RedisStore::dump_range(std::vector<ShardIO>& items, size_t begin, size_t end) {
    size_t count = end - begin;
    auto connection = acquire();
    std::string error = connection->ensure();
    if (!error.empty()) {
        release(std::move(connection));
        return all(count, error);
    }
    // Per shard: the command head, the caller's buffers as they are, the trailer (no copies).
    std::vector<std::string> heads(count);
    std::vector<std::string> tails(count);
    std::vector<std::array<uint8_t, kTrailerBytes>> trailers(count);
    std::string ttl = std::to_string(config_.ttl_s);
    auto prepare = [&](size_t k, std::vector<iovec>& iov) {
        const ShardIO& item = items[begin + k];
        Checksum checksum;
        for (const Buffer& b : item.buffers) checksum.update(b.data, b.size);
        Trailer trailer;
        trailer.payload_bytes = item.total_bytes();
        trailer.checksum = checksum.finish();
        trailer.shard = item.shard;
        trailer.num_shards = config_.num_shards;
        trailer.id = item.id;
        encode_trailer(trailer, trailers[k].data());
        std::string key = key_of(item.id);
        std::string field = std::to_string(item.shard);
        RedisConnection::append_command_head(heads[k], {"HSET", key, field}, trailer.payload_bytes + kTrailerBytes);
        tails[k] = kCrlf;
        if (config_.ttl_s > 0) RedisConnection::append_command(tails[k], {"EXPIRE", key, ttl});
        iov.push_back({heads[k].data(), heads[k].size()});
        for (const Buffer& b : item.buffers) iov.push_back({b.data, b.size});
        iov.push_back({trailers[k].data(), kTrailerBytes});
        iov.push_back({tails[k].data(), tails[k].size()});
    };
    auto send = [&](std::pair<size_t, size_t> window) {
        std::vector<iovec> iov;
        for (size_t k = window.first; k < window.second; ++k) prepare(k, iov);
        return connection->send(iov);
    };
    std::vector<std::string> errors(count);
    std::vector<std::pair<size_t, size_t>> parts = windows(items, begin, end);
    size_t replies = config_.ttl_s > 0 ? 2 : 1;
    size_t confirmed = 0;  // shards whose replies have all been read
    error = send(parts[0]);
    for (size_t w = 0; w < parts.size() && error.empty(); ++w) {
        if (w + 1 < parts.size()) error = send(parts[w + 1]);
        for (size_t k = parts[w].first; k < parts[w].second && error.empty(); ++k) {
            for (size_t r = 0; r < replies && error.empty(); ++r) {
                RedisReply reply;
                error = connection->read_reply(&reply);
                if (error.empty() && reply.type == '-' && errors[k].empty()) {
                    errors[k] = "redis refused the write: " + reply.text;
                }
            }
            if (error.empty()) confirmed = k + 1;
        }
    }
    // The connection failed: a shard whose reply was not read may or may not be stored; it fails.
    for (size_t k = confirmed; k < count && !error.empty(); ++k) {
        if (errors[k].empty()) errors[k] = error;
    }
    release(std::move(connection));
    return errors;
}

std::vector<std::string> RedisStore::load_range(std::vector<ShardIO>& items, size_t begin, size_t end) {
    size_t count = end - begin;
    auto connection = acquire();
    std::string error = connection->ensure();
    if (!error.empty()) {
        release(std::move(connection));
        return all(count, error);
    }
    bool sharded = config_.num_shards > 1;
    auto send = [&](std::pair<size_t, size_t> window) {
        std::string commands;
        for (size_t k = window.first; k < window.second; ++k) {
            const ShardIO& item = items[begin + k];
            std::string key = key_of(item.id);
            if (sharded) RedisConnection::append_command(commands, {"HLEN", key});
            RedisConnection::append_command(commands, {"HGET", key, std::to_string(item.shard)});
        }
        return connection->send({{commands.data(), commands.size()}});
    };
    std::vector<std::string> errors(count);
    std::vector<std::string> damaged;
    std::vector<std::pair<size_t, size_t>> parts = windows(items, begin, end);
    size_t k = 0;  // the next item whose reply is read
    error = send(parts[0]);
    for (size_t w = 0; w < parts.size() && error.empty(); ++w) {
        if (w + 1 < parts.size()) error = send(parts[w + 1]);
        for (k = parts[w].first; k < parts[w].second && error.empty(); ++k) {
            const ShardIO& item = items[begin + k];
            int64_t shards_written = config_.num_shards;
            if (sharded) {
                RedisReply reply;
                error = connection->read_reply(&reply);
                if (error.empty() && reply.type == ':') shards_written = reply.integer;
            }
            int64_t length = 0;
            std::string server_error;
            if (error.empty()) error = connection->read_bulk_header(&length, &server_error);
            if (!error.empty()) break;
            if (!server_error.empty()) {
                errors[k] = "redis refused the read: " + server_error;
                continue;
            }
            if (length < 0) {
                errors[k] = "not in the store";
                continue;
            }
            size_t expected = item.total_bytes() + kTrailerBytes;
            std::string why;
            if (shards_written < static_cast<int64_t>(config_.num_shards)) {
                why = "not in the store (" + std::to_string(shards_written) + " of " +
                      std::to_string(config_.num_shards) + " shards written)";
            } else if (static_cast<size_t>(length) != expected) {
                why = static_cast<size_t>(length) < kTrailerBytes
                          ? "stored shard is truncated (" + std::to_string(length) + " bytes)"
                          : "stored shard holds " + std::to_string(length - static_cast<int64_t>(kTrailerBytes)) +
                                " bytes but the buffers hold " + std::to_string(item.total_bytes());
            }
            if (!why.empty()) {
                errors[k] = why;
                error = connection->skip(static_cast<size_t>(length));
                if (!error.empty()) {
                    ++k;  // this item keeps its own reason
                    break;
                }
                continue;
            }
            bool bad = false;
            std::string outcome = read_shard(*connection, item, &bad);
            if (bad) damaged.push_back(key_of(item.id));
            if (!connection->is_open()) {
                error = outcome;
                break;
            }
            errors[k] = outcome;
        }
    }
    if (!error.empty()) {
        for (size_t j = k; j < count; ++j) errors[j] = error;
    }
    if (!damaged.empty() && connection->is_open()) {
        // A damaged block is dropped, so the next dump writes it again.
        std::string del;
        for (const std::string& key : damaged) RedisConnection::append_command(del, {"DEL", key});
        if (connection->send({{del.data(), del.size()}}).empty()) {
            for (size_t i = 0; i < damaged.size(); ++i) {
                RedisReply reply;
                if (!connection->read_reply(&reply).empty()) break;
            }
        }
    }
    release(std::move(connection));
    return errors;
}

std::string RedisStore::read_shard(RedisConnection& connection, const ShardIO& item, bool* damaged) {
    Checksum checksum;
    std::string error;
    size_t total = item.total_bytes();
    if (item.sink != nullptr) {
        // Through a per-thread buffer that stays in the CPU cache: read, checksum, hand on.
        size_t granule = item.sink->granule();
        size_t piece = std::max(granule, kPieceBytes / granule * granule);
        thread_local std::vector<uint8_t> bounce;
        if (bounce.size() < std::min(piece, total)) bounce.resize(std::min(piece, total));
        for (size_t offset = 0; offset < total && error.empty(); offset += piece) {
            size_t take = std::min(piece, total - offset);
            error = connection.read_exact(bounce.data(), take);
            if (!error.empty()) break;
            checksum.update(bounce.data(), take);
            item.sink->consume(item.sink_item, offset, bounce.data(), take);
        }
    } else {
        // Straight into the caller's buffers, each piece checksummed while it is still in cache.
        for (const Buffer& b : item.buffers) {
            for (size_t offset = 0; offset < b.size && error.empty(); offset += kPieceBytes) {
                size_t take = std::min(kPieceBytes, b.size - offset);
                error = connection.read_exact(b.data + offset, take);
                if (error.empty()) checksum.update(b.data + offset, take);
            }
            if (!error.empty()) break;
        }
    }
    uint8_t raw[kTrailerBytes];
    if (error.empty()) error = connection.read_exact(raw, kTrailerBytes);
    if (error.empty()) error = connection.read_crlf();
    if (!error.empty()) return error;
    Trailer trailer;
    std::string why = decode_trailer(raw, &trailer);
    if (why.empty()) {
        if (trailer.id != item.id || trailer.shard != item.shard || trailer.num_shards != config_.num_shards) {
            why = "stored shard belongs to another block or shard";
        } else if (trailer.payload_bytes != total) {
            why = "stored shard holds " + std::to_string(trailer.payload_bytes) + " bytes but the buffers hold " +
                  std::to_string(total);
        } else if (trailer.checksum != checksum.finish()) {
            why = "checksum mismatch: the stored bytes are corrupt";
        }
    } else {
        why = "stored shard is corrupt: " + why;
    }
    *damaged = !why.empty();
    return why;
}

std::string RedisStore::remove(const std::vector<std::string>& ids) {
    return for_each_key(ids, "DEL", [](size_t, const RedisReply&) {});
}

}  // namespace ucm
