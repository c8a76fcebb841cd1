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
constexpr size_t kSlots = 16384;
const char kCrlf[] = "\r\n";

std::vector<std::string> all(size_t count, const std::string& error) { return std::vector<std::string>(count, error); }

uint16_t crc16(const char* data, size_t size) {
    // CRC-16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster uses.
    uint16_t crc = 0;
    for (size_t i = 0; i < size; ++i) {
        crc ^= static_cast<uint16_t>(static_cast<uint8_t>(data[i])) << 8;
        for (int bit = 0; bit < 8; ++bit) crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021) : crc << 1;
    }
    return crc;
}

}  // namespace

uint16_t redis_cluster_slot(const std::string& key) {
    // Only the part between the first '{' and the next '}' is hashed, when that part is not empty.
    size_t open = key.find('{');
    if (open != std::string::npos) {
        size_t close = key.find('}', open + 1);
        if (close != std::string::npos && close > open + 1) {
            return crc16(key.data() + open + 1, close - open - 1) % kSlots;
        }
    }
    return crc16(key.data(), key.size()) % kSlots;
}

RedisStore::RedisStore(RedisStoreConfig config)
    : config_(std::move(config)), pool_(std::max<size_t>(1, config_.threads), "ucm-redis") {
    if (config_.num_shards == 0) throw std::invalid_argument("num_shards must be at least 1");
    nodes_.push_back(Node{config_.endpoint, {}});
    std::string error;
    release(0, acquire(0, &error));
    if (error.empty() && config_.cluster) error = refresh_slots();
    if (!error.empty()) {
        pool_.shutdown();
        throw std::runtime_error(error);
    }
}

RedisStore::~RedisStore() { close(); }

void RedisStore::close() {
    pool_.shutdown();
    std::lock_guard<std::mutex> lock(mutex_);
    for (Node& node : nodes_) node.idle.clear();
}

std::vector<std::string> RedisStore::nodes() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> out;
    for (const Node& node : nodes_) out.push_back(node.endpoint.describe());
    return out;
}

std::unique_ptr<RedisConnection> RedisStore::acquire(size_t node, std::string* error) {
    std::unique_ptr<RedisConnection> connection;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        std::vector<std::unique_ptr<RedisConnection>>& idle = nodes_[node].idle;
        if (idle.empty()) {
            connection = std::make_unique<RedisConnection>(nodes_[node].endpoint);
        } else {
            connection = std::move(idle.back());
            idle.pop_back();
        }
    }
    *error = connection->ensure();
    return connection;
}

void RedisStore::release(size_t node, std::unique_ptr<RedisConnection> connection) {
    if (!connection->is_open()) return;  // it failed: the next user connects afresh
    std::lock_guard<std::mutex> lock(mutex_);
    nodes_[node].idle.push_back(std::move(connection));
}

std::string RedisStore::refresh_slots() {
    // CLUSTER SLOTS: [[first slot, last slot, [host, port, id], replicas...], ...]; any node answers.
    size_t count;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        count = nodes_.size();
    }
    std::string error = "no node answered CLUSTER SLOTS";
    for (size_t node = 0; node < count; ++node) {
        auto connection = acquire(node, &error);
        std::string command;
        RedisConnection::append_command(command, {"CLUSTER", "SLOTS"});
        RedisReply reply;
        if (error.empty()) error = connection->send({{command.data(), command.size()}});
        if (error.empty()) error = connection->read_reply(&reply);
        release(node, std::move(connection));
        if (!error.empty()) continue;
        if (reply.type != '*') {
            return "redis " + config_.endpoint.describe() + " is not in cluster mode (CLUSTER SLOTS: " + reply.text + ")";
        }
        std::lock_guard<std::mutex> lock(mutex_);
        std::vector<uint16_t> owner(kSlots, UINT16_MAX);
        for (const RedisReply& range : reply.elements) {
            if (range.elements.size() < 3 || range.elements[2].elements.size() < 2) continue;
            const RedisReply& primary = range.elements[2];
            std::string host = primary.elements[0].text.empty() ? config_.endpoint.host : primary.elements[0].text;
            int port = static_cast<int>(primary.elements[1].integer);
            size_t index = nodes_.size();
            for (size_t i = 0; i < nodes_.size(); ++i) {
                if (nodes_[i].endpoint.host == host && nodes_[i].endpoint.port == port) index = i;
            }
            if (index == nodes_.size()) {
                RedisEndpoint endpoint = config_.endpoint;
                endpoint.host = host;
                endpoint.port = port;
                endpoint.unix_socket.clear();
                nodes_.push_back(Node{endpoint, {}});
            }
            for (int64_t slot = range.elements[0].integer; slot <= range.elements[1].integer && slot < 16384; ++slot) {
                owner[static_cast<size_t>(slot)] = static_cast<uint16_t>(index);
            }
        }
        if (std::count(owner.begin(), owner.end(), UINT16_MAX) != 0) {
            return "redis cluster at " + config_.endpoint.describe() + " does not cover every hash slot";
        }
        slot_node_ = std::move(owner);
        slots_stale_ = false;
        return {};
    }
    return error;
}

void RedisStore::note_moved(const std::string& server_error) {
    if (server_error.rfind("MOVED", 0) == 0 || server_error.rfind("ASK", 0) == 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        slots_stale_ = true;
    }
}

std::vector<size_t> RedisStore::route(const std::vector<std::string>& ids) {
    std::vector<size_t> node_of(ids.size(), 0);
    if (!config_.cluster) return node_of;
    bool stale;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stale = slots_stale_;
    }
    if (stale) refresh_slots();  // on failure the old map stays: its replies say MOVED again
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < ids.size(); ++i) node_of[i] = slot_node_[redis_cluster_slot(key_of(ids[i]))];
    return node_of;
}

std::string RedisStore::for_each_key(size_t node, const std::vector<std::string>& ids,
                                     const std::vector<size_t>& picks, const char* command,
                                     const std::function<void(size_t, const RedisReply&)>& on_reply) {
    std::string failure;
    auto connection = acquire(node, &failure);
    for (size_t first = 0; failure.empty() && first < picks.size(); first += kLookupBatch) {
        size_t last = std::min(picks.size(), first + kLookupBatch);
        std::string commands;
        for (size_t k = first; k < last; ++k) {
            RedisConnection::append_command(commands, {command, key_of(ids[picks[k]])});
        }
        failure = connection->send({{commands.data(), commands.size()}});
        for (size_t k = first; failure.empty() && k < last; ++k) {
            RedisReply reply;
            failure = connection->read_reply(&reply);
            if (!failure.empty()) break;
            if (reply.type == '-') {
                note_moved(reply.text);
                failure = std::string("redis refused ") + command + ": " + reply.text;
                connection->close();  // replies of this pipeline are still coming
                break;
            }
            on_reply(k, reply);
        }
    }
    release(node, std::move(connection));
    return failure;
}

namespace {

// The positions of `node_of` holding each node, node by node.
std::vector<std::vector<size_t>> by_node(const std::vector<size_t>& node_of, size_t nodes) {
    std::vector<std::vector<size_t>> groups(nodes);
    for (size_t i = 0; i < node_of.size(); ++i) {
        if (node_of[i] >= groups.size()) groups.resize(node_of[i] + 1);
        groups[node_of[i]].push_back(i);
    }
    return groups;
}

}  // namespace

std::vector<uint8_t> RedisStore::lookup(const std::vector<std::string>& ids, std::string* error) {
    std::vector<uint8_t> found(ids.size(), 0);
    std::vector<std::vector<size_t>> groups = by_node(route(ids), 1);
    std::string failure;
    for (size_t node = 0; node < groups.size() && failure.empty(); ++node) {
        const std::vector<size_t>& picks = groups[node];
        if (picks.empty()) continue;
        failure = for_each_key(node, ids, picks, "HLEN", [&](size_t k, const RedisReply& reply) {
            found[picks[k]] = reply.type == ':' && reply.integer >= static_cast<int64_t>(config_.num_shards);
        });
    }
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

TaskPtr RedisStore::in_groups(std::vector<ShardIO> items, GroupWork work) {
    auto task = std::make_shared<Task>(items.size());
    auto shared = std::make_shared<std::vector<ShardIO>>(std::move(items));
    std::vector<std::string> ids;
    ids.reserve(shared->size());
    for (const ShardIO& item : *shared) ids.push_back(item.id);
    std::vector<std::vector<size_t>> groups = by_node(route(ids), 1);
    // About one job per pool thread in all, each with consecutive items of one node.
    size_t per_job = std::max<size_t>(1, (shared->size() + pool_.size() - 1) / pool_.size());
    for (size_t node = 0; node < groups.size(); ++node) {
        for (size_t first = 0; first < groups[node].size(); first += per_job) {
            size_t last = std::min(groups[node].size(), first + per_job);
            std::vector<size_t> picks(groups[node].begin() + first, groups[node].begin() + last);
            pool_.submit([this, task, shared, node, picks = std::move(picks), work] {
                std::vector<std::string> errors = (this->*work)(node, *shared, picks);
                for (size_t k = 0; k < picks.size(); ++k) {
                    task->finish(picks[k], (*shared)[picks[k]].id, std::move(errors[k]));
                }
            });
        }
    }
    return task;
}

TaskPtr RedisStore::dump(std::vector<ShardIO> items) { return in_groups(std::move(items), &RedisStore::dump_group); }

TaskPtr RedisStore::load(std::vector<ShardIO> items) { return in_groups(std::move(items), &RedisStore::load_group); }

namespace {

// Splits items [0, count) into windows of about kWindowBytes of values. A range is sent one window
// ahead of the replies being read, so the server holds at most two windows of requests or replies
// for this connection instead of the whole range.
std::vector<std::pair<size_t, size_t>> windows(const std::vector<ShardIO>& items, const std::vector<size_t>& picks) {
    constexpr size_t kWindowBytes = 4 << 20;
    constexpr size_t kWindowItems = 512;
    std::vector<std::pair<size_t, size_t>> out;
    size_t first = 0;
    size_t bytes = 0;
    for (size_t k = 0; k < picks.size(); ++k) {
        bytes += items[picks[k]].total_bytes() + kTrailerBytes;
        if (bytes >= kWindowBytes || k + 1 - first >= kWindowItems) {
            out.emplace_back(first, k + 1);
            first = k + 1;
            bytes = 0;
        }
    }
    if (first < picks.size()) out.emplace_back(first, picks.size());
    return out;
}

}  // namespace

std::vector<std::string> RedisStore::dump_group(size_t node, std::vector<ShardIO>& items,
                                               const std::vector<size_t>& picks) {
    size_t count = picks.size();
    std::string error;
    auto connection = acquire(node, &error);
    if (!error.empty()) return all(count, error);  // the failed connection is dropped
    // Per shard: the command head, the caller's buffers as they are, the trailer (no copies).
    std::vector<std::string> heads(count);
    std::vector<std::string> tails(count);
    std::vector<std::array<uint8_t, kTrailerBytes>> trailers(count);
    std::string ttl = std::to_string(config_.ttl_s);
    auto prepare = [&](size_t k, std::vector<iovec>& iov) {
        const ShardIO& item = items[picks[k]];
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
    std::vector<std::pair<size_t, size_t>> parts = windows(items, picks);
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
                    note_moved(reply.text);
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
    release(node, std::move(connection));
    return errors;
}

std::vector<std::string> RedisStore::load_group(size_t node, std::vector<ShardIO>& items,
                                               const std::vector<size_t>& picks) {
    size_t count = picks.size();
    std::string error;
    auto connection = acquire(node, &error);
    if (!error.empty()) return all(count, error);  // the failed connection is dropped
    bool sharded = config_.num_shards > 1;
    auto send = [&](std::pair<size_t, size_t> window) {
        std::string commands;
        for (size_t k = window.first; k < window.second; ++k) {
            const ShardIO& item = items[picks[k]];
            std::string key = key_of(item.id);
            if (sharded) RedisConnection::append_command(commands, {"HLEN", key});
            RedisConnection::append_command(commands, {"HGET", key, std::to_string(item.shard)});
        }
        return connection->send({{commands.data(), commands.size()}});
    };
    std::vector<std::string> errors(count);
    std::vector<std::string> damaged;
    std::vector<std::pair<size_t, size_t>> parts = windows(items, picks);
    size_t k = 0;  // the next item whose reply is read
    error = send(parts[0]);
    for (size_t w = 0; w < parts.size() && error.empty(); ++w) {
        if (w + 1 < parts.size()) error = send(parts[w + 1]);
        for (k = parts[w].first; k < parts[w].second && error.empty(); ++k) {
            const ShardIO& item = items[picks[k]];
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
                note_moved(server_error);
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
                          : size_mismatch(static_cast<uint64_t>(length) - kTrailerBytes, item.total_bytes());
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
    release(node, std::move(connection));
    return errors;
}

std::string RedisStore::read_shard(RedisConnection& connection, const ShardIO& item, bool* damaged) {
    Checksum checksum;
    std::string error;
    size_t total = item.total_bytes();
    if (item.sink != nullptr) {
        // Through a per-thread buffer that stays in the CPU cache: read, checksum, hand on.
        size_t piece = sink_piece_bytes(*item.sink, kPieceBytes);
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
    why = why.empty() ? verify_trailer(trailer, item.id, item.shard, config_.num_shards, total, checksum.finish())
                      : "stored shard is corrupt: " + why;
    *damaged = !why.empty();
    return why;
}

std::string RedisStore::remove(const std::vector<std::string>& ids) {
    std::vector<std::vector<size_t>> groups = by_node(route(ids), 1);
    std::string failure;
    for (size_t node = 0; node < groups.size(); ++node) {
        if (groups[node].empty()) continue;
        std::string error = for_each_key(node, ids, groups[node], "DEL", [](size_t, const RedisReply&) {});
        if (failure.empty()) failure = error;
    }
    return failure;
}

}  // namespace ucm
