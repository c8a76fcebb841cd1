#include "task.h"

namespace ucm {

void Task::add_pending(size_t count) {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_ += count;
}

void Task::fail(std::string id, std::string reason) {
    std::lock_guard<std::mutex> lock(mutex_);
    failures_.push_back({std::move(id), std::move(reason)});
}

void Task::finish(const std::string& id, std::string error) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error.empty()) failures_.push_back({id, std::move(error)});
    if (--pending_ == 0) cv_.notify_all();
}

bool Task::done() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pending_ == 0;
}

std::vector<Failure> Task::wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return pending_ == 0; });
    return failures_;
}

}  // namespace ucm
