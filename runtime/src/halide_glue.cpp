#include "halide_glue.h"

#include "HalideRuntime.h"

#include <omp.h>

#include <atomic>
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <deque>
#include <mutex>

namespace ng {

namespace {

// Halide reports errors on the thread that hit them, which may be a pool worker: keep the last
// message per thread and, for the caller's thread to find, process-wide.
thread_local std::string g_halide_error;
std::mutex g_shared_error_mutex;
std::string g_shared_error;

struct HostParallelFor {
    ng_parallel_for_fn fn;
    void *context;
};
std::atomic<const HostParallelFor *> g_host_parallel_for{nullptr};

// NORMGEN_NUM_THREADS caps the OpenMP team; read once.
int thread_cap() {
    static const int cap = [] {
        const char *env = std::getenv("NORMGEN_NUM_THREADS");
        const long v = env ? std::strtol(env, nullptr, 10) : 0;
        return v > 0 && v < INT_MAX ? static_cast<int>(v) : INT_MAX;
    }();
    return cap;
}

void on_halide_error(void *, const char *message) {
    g_halide_error = message ? message : "";
    std::lock_guard<std::mutex> lock(g_shared_error_mutex);
    g_shared_error = g_halide_error;
}

struct HalideTask {
    halide_task_t task;
    void *user_context;
    int min;
    uint8_t *closure;
};

int run_halide_task(void *context, int index) {
    auto *t = static_cast<HalideTask *>(context);
    return t->task(t->user_context, t->min + index, t->closure);
}

int do_par_for(void *user_context, halide_task_t task, int min, int size, uint8_t *closure) {
    if (size <= 0) return 0;
    HalideTask t{task, user_context, min, closure};
    if (const HostParallelFor *host = g_host_parallel_for.load(std::memory_order_acquire))
        return host->fn(host->context, size, run_halide_task, &t);
    const int threads = std::min({omp_get_max_threads(), thread_cap(), size});
    if (threads <= 1 || omp_in_parallel()) {
        for (int i = 0; i < size; i++)
            if (int r = run_halide_task(&t, i)) return r;
        return 0;
    }
    std::atomic<int> result{0};
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < size; i++) {
        if (result.load(std::memory_order_relaxed) != 0) continue;
        if (int r = run_halide_task(&t, i)) result.store(r, std::memory_order_relaxed);
    }
    return result.load();
}

}  // namespace

void install_halide_hooks() {
    static std::once_flag once;
    std::call_once(once, [] {
        halide_set_error_handler(on_halide_error);
        halide_set_custom_do_par_for(do_par_for);
    });
}

std::string take_halide_error() {
    std::string message;
    message.swap(g_halide_error);
    std::lock_guard<std::mutex> lock(g_shared_error_mutex);
    if (message.empty()) message = g_shared_error;
    g_shared_error.clear();
    return message.empty() ? "(no message)" : message;
}

}  // namespace ng

extern "C" void ng_set_parallel_for(ng_parallel_for_fn parallel_for, void *host_context) {
    // Hooks are few in a process's life; every one is kept until exit so that a kernel running
    // concurrently on another thread never reads a freed hook.
    static std::mutex mutex;
    static std::deque<ng::HostParallelFor> hooks;
    const ng::HostParallelFor *hook = nullptr;
    if (parallel_for) {
        std::lock_guard<std::mutex> lock(mutex);
        hook = &hooks.emplace_back(ng::HostParallelFor{parallel_for, host_context});
    }
    ng::g_host_parallel_for.store(hook, std::memory_order_release);
}
