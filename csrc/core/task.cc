#include "task.h"

#include <algorithm>

namespace ucm {

void Task::add_pending(size_t count) {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_ += count;
}

void Task::fail(size_t index, std::string id, std::string reason) {
    std::lock_guard<std::mutex> lock(mutex_);
    failures_.push_back({index, {std::move(id), std::move(reason)}});
}

void Task::finish(size_t index, const std::string& id, std::string error) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error.empty()) failures_.push_back({index, {id, std::move(error)}});
    if (--pending_ == 0) cv_.notify_all();
}

bool Task::done() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pending_ == 0;
}

std::vector<Failure> Task::wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return pending_ == 0; });
    std::stable_sort(failures_.begin(), failures_.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<Failure> out;
    out.reserve(failures_.size());
    for (const auto& entry : failures_) out.push_back(entry.second);
    return out;
}

}  // namespace ucm
