// ucm.store._native: the binding between the Python store API and the C++ core.
//
// Python objects are turned into plain (pointer, size) buffers here, with the GIL held; the
// objects stay referenced by the task until it has finished. Everything that blocks or copies
// runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <thread>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "buffer.h"
#include "checksum.h"
#include "dlpack.h"
#include "memory_cache.h"
#include "paged_cache.h"
#include "paged_copy.h"
#include "posix_store.h"
#include "redis_store.h"
#include "task.h"

namespace py = pybind11;

namespace {

using ucm_python::kDLCPU;
using ucm_python::kDLCUDAHost;

// Python objects a task's buffers come from; released (with the GIL) once the task is over.
struct Keepalive {
    std::vector<Py_buffer> views;
    std::vector<py::object> objects;
    Keepalive() = default;
    Keepalive(const Keepalive&) = delete;
    ~Keepalive() {
        for (Py_buffer& view : views) PyBuffer_Release(&view);
    }
};

std::string where(size_t index, std::optional<size_t> part) {
    std::string text = "buffers[" + std::to_string(index) + "]";
    if (part) text += "[" + std::to_string(*part) + "]";
    return text;
}

ucm::Buffer from_dlpack(py::handle obj, const std::string& name, Keepalive& keep) {
    ucm_python::DLPackView view = ucm_python::dlpack_view(obj, name);
    if (view.device.device_type != kDLCPU && view.device.device_type != kDLCUDAHost) {
        throw py::value_error(name + " is a device tensor; this store takes host memory (move it to the CPU)");
    }
    keep.objects.push_back(std::move(view.capsule));  // unconsumed: its destructor frees the tensor view
    return {view.data, view.nbytes};
}

ucm::Buffer to_buffer(py::handle obj, bool writable, const std::string& name, Keepalive& keep) {
    if (py::isinstance<py::tuple>(obj) && py::len(obj) == 2) {
        py::tuple pair = py::reinterpret_borrow<py::tuple>(obj);
        if (py::isinstance<py::int_>(pair[0]) && py::isinstance<py::int_>(pair[1])) {
            auto address = pair[0].cast<uintptr_t>();
            auto size = pair[1].cast<size_t>();
            if (address == 0) throw py::value_error(name + " is a null address");
            return {reinterpret_cast<uint8_t*>(address), size};
        }
    }
    if (PyObject_CheckBuffer(obj.ptr())) {
        Py_buffer view;
        int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj.ptr(), &view, flags) != 0) {
            PyErr_Clear();
            if (writable && PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) == 0) {
                PyBuffer_Release(&view);
                throw py::value_error(name + " is read-only; a load needs writable buffers");
            }
            throw py::value_error(name + " is not a C-contiguous buffer");
        }
        keep.views.push_back(view);
        return {static_cast<uint8_t*>(view.buf), static_cast<size_t>(view.len)};
    }
    if (py::hasattr(obj, "__dlpack__")) return from_dlpack(obj, name, keep);
    throw py::type_error(name + " has type " + std::string(py::str(obj.get_type().attr("__name__"))) +
                         "; expected a buffer, a DLPack tensor, an (address, nbytes) tuple, or a list of them");
}

std::string to_id(py::handle obj, size_t index) {
    if (!PyBytes_Check(obj.ptr())) {
        throw py::value_error("ids[" + std::to_string(index) + "] must be bytes, got " +
                              std::string(py::str(obj.get_type().attr("__name__"))));
    }
    size_t size = static_cast<size_t>(PyBytes_GET_SIZE(obj.ptr()));
    if (size == 0 || size > ucm::kMaxIdBytes) {
        throw py::value_error("ids[" + std::to_string(index) + "] is " + std::to_string(size) +
                              " bytes; ids must be 1.." + std::to_string(ucm::kMaxIdBytes) + " bytes");
    }
    return std::string(PyBytes_AS_STRING(obj.ptr()), size);
}

std::vector<std::string> to_ids(const py::sequence& ids) {
    std::vector<std::string> out;
    out.reserve(py::len(ids));
    for (size_t i = 0; i < out.capacity(); ++i) out.push_back(to_id(ids[i], i));
    return out;
}

// shards[i] for each of `count` ids (all 0 when shards is None); raises ValueError naming a bad one.
std::vector<uint32_t> to_shards(const py::object& shards, size_t count, uint32_t num_shards) {
    std::vector<uint32_t> out(count, 0);
    if (shards.is_none()) return out;
    py::sequence list = shards.cast<py::sequence>();
    if (py::len(list) != count) {
        throw py::value_error("got " + std::to_string(count) + " ids but " + std::to_string(py::len(list)) +
                              " shards");
    }
    for (size_t i = 0; i < count; ++i) {
        py::handle shard = list[i];
        long value = py::isinstance<py::int_>(shard) ? shard.cast<long>() : -1;
        if (value < 0 || value >= static_cast<long>(num_shards)) {
            throw py::value_error("shards[" + std::to_string(i) + "] = " + std::string(py::repr(shard)) +
                                  " is outside 0.." + std::to_string(num_shards - 1) + " (num_shards)");
        }
        out[i] = static_cast<uint32_t>(value);
    }
    return out;
}

// Checks a whole batch and describes it as ShardIO items; raises ValueError/TypeError naming what is wrong.
std::vector<ucm::ShardIO> to_items(const py::sequence& ids, const py::sequence& buffers, const py::object& shards,
                                   uint32_t num_shards, uint64_t shard_bytes, bool writable, Keepalive& keep) {
    size_t count = py::len(ids);
    if (py::len(buffers) != count) {
        throw py::value_error("got " + std::to_string(count) + " ids but " + std::to_string(py::len(buffers)) +
                              " buffers");
    }
    std::vector<uint32_t> shard_of = to_shards(shards, count, num_shards);
    std::vector<ucm::ShardIO> items(count);
    for (size_t i = 0; i < count; ++i) {
        ucm::ShardIO& item = items[i];
        item.id = to_id(ids[i], i);
        item.shard = shard_of[i];
        py::handle entry = buffers[i];
        bool is_pair = py::isinstance<py::tuple>(entry) && py::len(entry) == 2 &&
                       py::isinstance<py::int_>(py::reinterpret_borrow<py::tuple>(entry)[0]);
        if ((py::isinstance<py::list>(entry) || py::isinstance<py::tuple>(entry)) && !is_pair) {
            py::sequence parts = py::reinterpret_borrow<py::sequence>(entry);
            for (size_t p = 0; p < py::len(parts); ++p) {
                item.buffers.push_back(to_buffer(parts[p], writable, where(i, p), keep));
            }
        } else {
            item.buffers.push_back(to_buffer(entry, writable, where(i, std::nullopt), keep));
        }
        size_t total = item.total_bytes();
        if (total == 0) throw py::value_error(where(i, std::nullopt) + " hold no bytes");
        if (shard_bytes != 0 && total != shard_bytes) {
            throw py::value_error(where(i, std::nullopt) + " hold " + std::to_string(total) +
                                  " bytes but shard_bytes is " + std::to_string(shard_bytes));
        }
    }
    return items;
}

// A running batch, as Python sees it.
class PyTask {
public:
    PyTask(ucm::TaskPtr task, std::unique_ptr<Keepalive> keep) : task_(std::move(task)), keep_(std::move(keep)) {}
    PyTask(PyTask&&) = default;
    ~PyTask() {
        if (keep_ && !task_->done()) {
            py::gil_scoped_release release;
            task_->wait();  // the buffers must outlive the copies into and out of them
        }
    }

    bool done() {
        if (!task_->done()) return false;
        keep_.reset();
        return true;
    }

    // Returns [(id, reason), ...] for the blocks that failed.
    py::list wait() {
        std::vector<ucm::Failure> failures;
        {
            py::gil_scoped_release release;
            failures = task_->wait();
        }
        keep_.reset();
        py::list out;
        for (const ucm::Failure& f : failures) out.append(py::make_tuple(py::bytes(f.id), f.reason));
        return out;
    }

private:
    ucm::TaskPtr task_;
    std::unique_ptr<Keepalive> keep_;
};

py::list to_bool_list(const std::vector<uint8_t>& found) {
    py::list out(found.size());
    for (size_t i = 0; i < found.size(); ++i) out[i] = py::bool_(found[i] != 0);
    return out;
}

template <typename Store>
py::list lookup(Store& store, const py::sequence& ids) {
    std::vector<std::string> keys = to_ids(ids);
    std::vector<uint8_t> found;
    {
        py::gil_scoped_release release;
        found = store.lookup(keys);
    }
    return to_bool_list(found);
}

template <typename Store>
size_t lookup_prefix(Store& store, const py::sequence& ids) {
    std::vector<std::string> keys = to_ids(ids);
    py::gil_scoped_release release;
    return store.lookup_prefix(keys);
}

// A dump or load of buffers on a store with dump(items) and load(items).
template <typename Store>
PyTask submit_transfer(Store& store, const py::sequence& ids, const py::sequence& buffers, const py::object& shards,
                       uint32_t num_shards, uint64_t shard_bytes, bool load) {
    auto keep = std::make_unique<Keepalive>();
    auto items = to_items(ids, buffers, shards, num_shards, shard_bytes, load, *keep);
    ucm::TaskPtr task;
    {
        py::gil_scoped_release release;
        task = load ? store.load(std::move(items)) : store.dump(std::move(items));
    }
    return PyTask(std::move(task), std::move(keep));
}

// Loads item i of a paged-cache sink from block ids[i]; the sink stays referenced until the task is over.
template <typename Store>
PyTask submit_load_into(Store& store, const py::sequence& ids, const py::object& sink_object,
                        const py::object& shards, uint32_t num_shards, uint64_t shard_bytes) {
    auto& sink = sink_object.cast<ucm::PagedScatter&>();
    size_t count = py::len(ids);
    if (count != sink.count()) {
        throw py::value_error("got " + std::to_string(count) + " ids but the target holds " +
                              std::to_string(sink.count()) + " chunks");
    }
    if (shard_bytes != 0 && sink.chunk_bytes() != shard_bytes) {
        throw py::value_error("the target's chunks hold " + std::to_string(sink.chunk_bytes()) +
                              " bytes but shard_bytes is " + std::to_string(shard_bytes));
    }
    std::vector<uint32_t> shard_of = to_shards(shards, count, num_shards);
    std::vector<ucm::ShardIO> items(count);
    for (size_t i = 0; i < count; ++i) {
        items[i].id = to_id(ids[i], i);
        items[i].shard = shard_of[i];
        items[i].sink = &sink;
        items[i].sink_item = i;
        items[i].sink_bytes = sink.chunk_bytes();
    }
    auto keep = std::make_unique<Keepalive>();
    keep->objects.push_back(sink_object);
    ucm::TaskPtr task;
    {
        py::gil_scoped_release release;
        task = store.load(std::move(items));
    }
    return PyTask(std::move(task), std::move(keep));
}

class PyPosixStore {
public:
    PyPosixStore(std::string root, uint32_t num_shards, size_t threads, bool direct_io, uint64_t capacity_bytes,
                 bool fsync, uint64_t shard_bytes, uint64_t shared_memory_bytes, std::string shared_memory_dir,
                 std::string shared_memory_name)
        : num_shards_(num_shards), shard_bytes_(shard_bytes) {
        ucm::PosixConfig config{std::move(root), num_shards,          threads,
                                direct_io,       capacity_bytes,      fsync,
                                shared_memory_bytes, std::move(shared_memory_dir),
                                std::move(shared_memory_name)};
        py::gil_scoped_release release;
        store_ = std::make_unique<ucm::PosixStore>(std::move(config));
    }

    PyTask transfer(const py::sequence& ids, const py::sequence& buffers, const py::object& shards, bool load) {
        return submit_transfer(*store_, ids, buffers, shards, num_shards_, shard_bytes_, load);
    }

    PyTask load_into(const py::sequence& ids, const py::object& sink, const py::object& shards) {
        return submit_load_into(*store_, ids, sink, shards, num_shards_, shard_bytes_);
    }

    ucm::PosixStore& store() { return *store_; }

private:
    uint32_t num_shards_;
    uint64_t shard_bytes_;
    std::unique_ptr<ucm::PosixStore> store_;
};

// The `redis` store: the same transfers as posix, over connections to a Redis or Valkey server.
class PyRedisStore {
public:
    PyRedisStore(const py::dict& endpoint, std::string prefix, uint32_t num_shards, size_t threads, uint64_t ttl_s,
                 uint64_t shard_bytes)
        : num_shards_(num_shards), shard_bytes_(shard_bytes) {
        ucm::RedisStoreConfig config;
        config.endpoint.host = endpoint["host"].cast<std::string>();
        config.endpoint.port = endpoint["port"].cast<int>();
        config.endpoint.unix_socket = endpoint["unix_socket"].cast<std::string>();
        config.endpoint.username = endpoint["username"].cast<std::string>();
        config.endpoint.password = endpoint["password"].cast<std::string>();
        config.endpoint.db = endpoint["db"].cast<int>();
        config.endpoint.timeout_s = endpoint["timeout_s"].cast<double>();
        config.endpoint.tls = endpoint["tls"].cast<bool>();
        config.endpoint.tls_verify = endpoint["tls_verify"].cast<bool>();
        config.endpoint.tls_ca_file = endpoint["tls_ca_file"].cast<std::string>();
        config.endpoint.tls_cert_file = endpoint["tls_cert_file"].cast<std::string>();
        config.endpoint.tls_key_file = endpoint["tls_key_file"].cast<std::string>();
        config.endpoint.tls_server_name = endpoint["tls_server_name"].cast<std::string>();
        config.cluster = endpoint["cluster"].cast<bool>();
        config.prefix = std::move(prefix);
        config.num_shards = num_shards;
        config.threads = threads;
        config.ttl_s = ttl_s;
        std::string error;
        {
            py::gil_scoped_release release;
            try {
                store_ = std::make_unique<ucm::RedisStore>(std::move(config));
            } catch (const std::exception& exc) {
                error = exc.what();
            }
        }
        if (!error.empty()) throw py::value_error(error);
    }

    // Returns (found, error): an unreachable server gives misses and says why.
    py::tuple lookup(const py::sequence& ids) {
        std::vector<std::string> keys = to_ids(ids);
        std::vector<uint8_t> found;
        std::string error;
        {
            py::gil_scoped_release release;
            found = store_->lookup(keys, &error);
        }
        return py::make_tuple(to_bool_list(found), error);
    }

    py::tuple lookup_prefix(const py::sequence& ids) {
        std::vector<std::string> keys = to_ids(ids);
        size_t count = 0;
        std::string error;
        {
            py::gil_scoped_release release;
            count = store_->lookup_prefix(keys, &error);
        }
        return py::make_tuple(count, error);
    }

    PyTask transfer(const py::sequence& ids, const py::sequence& buffers, const py::object& shards, bool load) {
        return submit_transfer(*store_, ids, buffers, shards, num_shards_, shard_bytes_, load);
    }

    PyTask load_into(const py::sequence& ids, const py::object& sink, const py::object& shards) {
        return submit_load_into(*store_, ids, sink, shards, num_shards_, shard_bytes_);
    }

    std::string remove(const py::sequence& ids) {
        auto keys = to_ids(ids);
        py::gil_scoped_release release;
        return store_->remove(keys);
    }

    std::vector<std::string> nodes() { return store_->nodes(); }

    void close() {
        py::gil_scoped_release release;
        store_->close();
    }

private:
    uint32_t num_shards_;
    uint64_t shard_bytes_;
    std::unique_ptr<ucm::RedisStore> store_;
};

class PyMemoryCache {
public:
    PyMemoryCache(uint64_t capacity_bytes, uint32_t num_shards, size_t threads, uint64_t write_behind_bytes,
                  uint64_t shard_bytes)
        : num_shards_(num_shards),
          shard_bytes_(shard_bytes),
          cache_(ucm::MemoryConfig{capacity_bytes, num_shards, threads, write_behind_bytes}) {}

    PyTask dump(const py::sequence& ids, const py::sequence& buffers, const py::object& shards, bool dirty) {
        auto keep = std::make_unique<Keepalive>();
        auto items = to_items(ids, buffers, shards, num_shards_, shard_bytes_, false, *keep);
        ucm::TaskPtr task;
        {
            py::gil_scoped_release release;
            task = cache_.dump(std::move(items), dirty);
        }
        return PyTask(std::move(task), std::move(keep));
    }

    py::tuple load(const py::sequence& ids, const py::sequence& buffers, const py::object& shards) {
        auto keep = std::make_unique<Keepalive>();
        auto items = to_items(ids, buffers, shards, num_shards_, shard_bytes_, true, *keep);
        std::vector<size_t> missing;
        ucm::TaskPtr task;
        {
            py::gil_scoped_release release;
            task = cache_.load(std::move(items), &missing);
        }
        return py::make_tuple(PyTask(std::move(task), std::move(keep)), py::cast(missing));
    }

    py::list take_dirty(size_t max_items, double timeout_s) {
        std::vector<ucm::DirtyShard> shards;
        {
            py::gil_scoped_release release;
            shards = cache_.take_dirty(max_items, timeout_s);
        }
        py::list out;
        for (const ucm::DirtyShard& s : shards) {
            out.append(py::make_tuple(py::bytes(s.id), s.shard, reinterpret_cast<uintptr_t>(s.data), s.size));
        }
        return out;
    }

    void finish_dirty(const py::list& taken) {
        std::vector<ucm::DirtyShard> shards;
        for (py::handle item : taken) {
            auto t = item.cast<py::tuple>();
            shards.push_back({t[0].cast<std::string>(), t[1].cast<uint32_t>(),
                              reinterpret_cast<uint8_t*>(t[2].cast<uintptr_t>()), t[3].cast<size_t>()});
        }
        py::gil_scoped_release release;
        cache_.finish_dirty(shards);
    }

    ucm::MemoryCache& cache() { return cache_; }

private:
    uint32_t num_shards_;
    uint64_t shard_bytes_;
    ucm::MemoryCache cache_;
};

ucm::ThreadPool& copy_pool() {
    static ucm::ThreadPool pool(std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 16) - 1, "ucm-copy");
    return pool;
}

void copy_chunks(bool to_staging, const std::vector<uintptr_t>& keys, const std::vector<uintptr_t>& values,
                 const std::array<int64_t, 4>& key_strides, const std::array<int64_t, 4>& value_strides,
                 size_t elem_bytes, std::vector<int64_t> blocks, std::vector<int64_t> token_offsets, size_t heads,
                 size_t chunk_tokens, size_t head_size, uintptr_t staging, const std::string& packing,
                 size_t block_tokens) {
    ucm_python::PagedCache cache = ucm_python::to_paged_cache(keys, values, key_strides, value_strides, elem_bytes,
                                                              heads, chunk_tokens, head_size, packing, block_tokens);
    if (blocks.size() != token_offsets.size()) throw py::value_error("blocks and token_offsets differ in length");
    py::gil_scoped_release release;  // ucm::copy_chunks checks the packing (std::invalid_argument: ValueError)
    ucm::copy_chunks(to_staging, cache.layers, cache.geometry, blocks, token_offsets,
                     reinterpret_cast<uint8_t*>(staging), copy_pool());
}

std::shared_ptr<ucm::PagedScatter> make_paged_scatter(
    const std::vector<uintptr_t>& keys, const std::vector<uintptr_t>& values, const std::array<int64_t, 4>& key_strides,
    const std::array<int64_t, 4>& value_strides, size_t elem_bytes, size_t heads, size_t chunk_tokens,
    size_t head_size, std::vector<int64_t> blocks, std::vector<int64_t> token_offsets, const std::string& packing,
    size_t block_tokens) {
    ucm_python::PagedCache cache = ucm_python::to_paged_cache(keys, values, key_strides, value_strides, elem_bytes,
                                                              heads, chunk_tokens, head_size, packing, block_tokens);
    try {
        return std::make_shared<ucm::PagedScatter>(std::move(cache.layers), cache.geometry, std::move(blocks),
                                                   std::move(token_offsets));
    } catch (const std::invalid_argument& exc) {
        throw py::value_error(exc.what());
    }
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native core of ucm.store (C++; no Python-side copies on the data path).";

    py::class_<PyTask>(m, "Task")
        .def("done", &PyTask::done, "True once every block of the task has finished.")
        .def("wait", &PyTask::wait, "Block until done; return [(id, reason)] of the failed blocks.");

    py::class_<PyPosixStore>(m, "PosixStore")
        .def(py::init<std::string, uint32_t, size_t, bool, uint64_t, bool, uint64_t, uint64_t, std::string,
                      std::string>(),
             py::arg("root"), py::arg("num_shards"), py::arg("threads"), py::arg("direct_io"),
             py::arg("capacity_bytes"), py::arg("fsync"), py::arg("shard_bytes"), py::arg("shared_memory_bytes"),
             py::arg("shared_memory_dir"), py::arg("shared_memory_name"))
        .def("lookup", [](PyPosixStore& s, const py::sequence& ids) { return lookup(s.store(), ids); })
        .def("lookup_prefix", [](PyPosixStore& s, const py::sequence& ids) { return lookup_prefix(s.store(), ids); })
        .def("dump", [](PyPosixStore& s, const py::sequence& ids, const py::sequence& buffers,
                        const py::object& shards) { return s.transfer(ids, buffers, shards, false); })
        .def("load", [](PyPosixStore& s, const py::sequence& ids, const py::sequence& buffers,
                        const py::object& shards) { return s.transfer(ids, buffers, shards, true); })
        .def("load_into", &PyPosixStore::load_into, py::arg("ids"), py::arg("sink"), py::arg("shards"))
        .def("prefetch",
             [](PyPosixStore& s, const py::sequence& ids) {
                 auto keys = to_ids(ids);
                 py::gil_scoped_release release;
                 s.store().prefetch(keys);
             })
        .def("remove",
             [](PyPosixStore& s, const py::sequence& ids) {
                 auto keys = to_ids(ids);
                 py::gil_scoped_release release;
                 s.store().remove(keys);
             })
        .def("evict_now", [](PyPosixStore& s) {
            py::gil_scoped_release release;
            return s.store().evict_now();
        })
        .def(
            "prewarm",
            [](PyPosixStore& s, uint64_t budget_bytes, int shard) {
                py::gil_scoped_release release;
                s.store().prewarm(budget_bytes, shard);
            },
            py::arg("budget_bytes"), py::arg("shard"))
        .def("prewarm_stats",
             [](PyPosixStore& s) {
                 ucm::PrewarmStats stats = s.store().prewarm_stats();  // atomics: no wait
                 py::dict out;
                 out["running"] = stats.running;
                 out["files"] = stats.files;
                 out["bytes"] = stats.bytes;
                 out["seconds"] = stats.seconds;
                 return out;
             })
        .def("wait_shared_memory",
             [](PyPosixStore& s) {
                 py::gil_scoped_release release;
                 s.store().wait_fills();
             })
        .def("shared_memory_stats",
             [](PyPosixStore& s) {
                 ucm::SharedTierStats stats;
                 {
                     py::gil_scoped_release release;
                     stats = s.store().shared_memory_stats();
                 }
                 py::dict out;
                 out["hits"] = stats.hits;
                 out["misses"] = stats.misses;
                 out["stale"] = stats.stale;
                 out["failed"] = stats.failed;
                 out["written"] = stats.written;
                 out["unwritten"] = stats.unwritten;
                 out["arenas"] = stats.arenas;
                 out["slots"] = stats.slots;
                 out["filled"] = stats.filled;
                 out["writing"] = stats.writing;
                 out["error"] = stats.error;
                 return out;
             })
        .def("shared_memory_hits", [](PyPosixStore& s) { return s.store().shared_memory_hits(); })
        .def("close", [](PyPosixStore& s) {
            py::gil_scoped_release release;
            s.store().close();
        });

    py::class_<PyRedisStore>(m, "RedisStore")
        .def(py::init<const py::dict&, std::string, uint32_t, size_t, uint64_t, uint64_t>(), py::arg("endpoint"),
             py::arg("prefix"), py::arg("num_shards"), py::arg("threads"), py::arg("ttl_s"), py::arg("shard_bytes"))
        .def("lookup", &PyRedisStore::lookup)
        .def("lookup_prefix", &PyRedisStore::lookup_prefix)
        .def("dump", [](PyRedisStore& s, const py::sequence& ids, const py::sequence& buffers,
                        const py::object& shards) { return s.transfer(ids, buffers, shards, false); })
        .def("load", [](PyRedisStore& s, const py::sequence& ids, const py::sequence& buffers,
                        const py::object& shards) { return s.transfer(ids, buffers, shards, true); })
        .def("load_into", &PyRedisStore::load_into, py::arg("ids"), py::arg("sink"), py::arg("shards"))
        .def("remove", &PyRedisStore::remove)
        .def("nodes", &PyRedisStore::nodes)
        .def("close", &PyRedisStore::close);

    py::class_<PyMemoryCache>(m, "MemoryCache")
        .def(py::init<uint64_t, uint32_t, size_t, uint64_t, uint64_t>(), py::arg("capacity_bytes"),
             py::arg("num_shards"), py::arg("threads"), py::arg("write_behind_bytes"), py::arg("shard_bytes"))
        .def("lookup", [](PyMemoryCache& s, const py::sequence& ids) { return lookup(s.cache(), ids); })
        .def("lookup_prefix", [](PyMemoryCache& s, const py::sequence& ids) { return lookup_prefix(s.cache(), ids); })
        .def("dump", &PyMemoryCache::dump, py::arg("ids"), py::arg("buffers"), py::arg("shards"), py::arg("dirty"))
        .def("load", &PyMemoryCache::load)
        .def("remove",
             [](PyMemoryCache& s, const py::sequence& ids) {
                 auto keys = to_ids(ids);
                 py::gil_scoped_release release;
                 s.cache().remove(keys);
             })
        .def("take_dirty", &PyMemoryCache::take_dirty)
        .def("finish_dirty", &PyMemoryCache::finish_dirty)
        .def("wait_in_flight",
             [](PyMemoryCache& s) {
                 py::gil_scoped_release release;
                 s.cache().wait_in_flight();
             })
        .def("wait_clean",
             [](PyMemoryCache& s) {
                 py::gil_scoped_release release;
                 s.cache().wait_clean();
             })
        .def("close", [](PyMemoryCache& s) { s.cache().close(); })
        .def("used_bytes", [](PyMemoryCache& s) { return s.cache().used_bytes(); });

    py::class_<ucm::PagedScatter, std::shared_ptr<ucm::PagedScatter>>(m, "PagedScatter")
        .def(py::init(&make_paged_scatter), py::arg("keys"), py::arg("values"), py::arg("key_strides"),
             py::arg("value_strides"), py::arg("elem_bytes"), py::arg("heads"), py::arg("chunk_tokens"),
             py::arg("head_size"), py::arg("blocks"), py::arg("token_offsets"), py::arg("packing") = "strided",
             py::arg("block_tokens") = 0)
        .def_property_readonly("chunk_bytes", &ucm::PagedScatter::chunk_bytes)
        .def("__len__", &ucm::PagedScatter::count);

    m.def("copy_chunks", &copy_chunks, py::arg("to_staging"), py::arg("keys"), py::arg("values"),
          py::arg("key_strides"), py::arg("value_strides"), py::arg("elem_bytes"), py::arg("blocks"),
          py::arg("token_offsets"), py::arg("heads"), py::arg("chunk_tokens"), py::arg("head_size"), py::arg("staging"),
          py::arg("packing") = "strided", py::arg("block_tokens") = 0,
          "Copy KV chunks between a paged host cache and a staging buffer in the chunk format (GIL released).");

    m.def(
        "checksum",
        [](const py::buffer& data) {
            py::buffer_info info = data.request();
            return ucm::Checksum::of(info.ptr, static_cast<size_t>(info.size * info.itemsize));
        },
        "The 64-bit block checksum of a contiguous buffer (docs/store.md).");
}
