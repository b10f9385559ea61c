// Shared helpers of the CPU kernels: 16-bit weight loads widened to fp32, horizontal sums,
// and the thread count. Each kernel's cpu.cc includes this header by relative path.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace mindcpm {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise the mantissa
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400) == 0);
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Weight element types: T is the stored type; get() widens one element, load8() eight.
struct F32 {
  using T = float;
  static float get(const T *p) { return *p; }
#ifdef __AVX2__
  static __m256 load8(const T *p) { return _mm256_loadu_ps(p); }
#endif
};
struct BF16 {
  using T = uint16_t;
  static float get(const T *p) { return bf16_to_f32(*p); }
#ifdef __AVX2__
  static __m256 load8(const T *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
#endif
};
struct F16 {
  using T = uint16_t;
  static float get(const T *p) { return f16_to_f32(*p); }
#ifdef __AVX2__
  static __m256 load8(const T *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
#endif
};

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Threads per kernel call: MINDCPM_KERNEL_THREADS, else every processor this process may use.
inline int num_threads() {
  static int n = [] {
    const char *env = std::getenv("MINDCPM_KERNEL_THREADS");
    int v = env ? std::atoi(env) : 0;
    if (v > 0) return v;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, (int)std::thread::hardware_concurrency());
  }();
  return n;
}

// A small persistent thread pool that degrades gracefully on a busy machine.
// Not OpenMP: libgomp's workers spin long after each parallel region, stealing the cores that
// MindSpore's threads and other processes need, and a static split makes every kernel wait for
// a descheduled thread (measured: decode 3-4x slower under load). Here work is claimed in
// chunks from an atomic counter (parallel_chunks) by the caller and whichever workers show up:
// a worker that is not running simply takes no chunk, and the caller never waits for a thread that has not
// joined. Workers spin ~50 us for the next kernel of the step, then sleep.
class Pool;
// The process's one pool, defined in runtime.cc: every op's library links that one shared
// library, so all kernels share the same workers instead of one spinning set per op.
extern "C" Pool &mindcpm_shared_pool();

class Pool {
 public:
  static Pool &get() { return mindcpm_shared_pool(); }
  explicit Pool(int n) {
    for (int t = 1; t < n; ++t) workers_.emplace_back([this, t] { loop(t - 1); });
  }
  int size() const { return (int)workers_.size() + 1; }

  // Runs fn() on the caller and on every worker that joins before the caller is done;
  // fn must claim its own work (see parallel_chunks). Called outside a launched task while one
  // runs, it first waits for that task (sync).
  void run(const std::function<void()> &fn) {
    if (workers_.empty()) {
      fn();
      return;
    }
    if (task_running_.load(std::memory_order_acquire) && std::this_thread::get_id() != workers_[0].get_id()) sync();
    std::lock_guard<std::mutex> serial(call_mutex_);  // one parallel region at a time
    Job job{&fn};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = &job;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = nullptr;
    }
    for (int spins = 0; job.refs.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 4096) cpu_relax(); else sched_yield();
    }
  }

  // An asynchronous task: launch() hands task() to the first worker and returns at once; its
  // parallel regions are helped by the other workers and by a thread waiting in sync(). launch()
  // syncs the previous tasks first; enqueue() does not: its task runs after them, on the same
  // worker. A decode step's layer ops return this way so that MindSpore's host work between two
  // ops (~30 us an op once the layer's weights have flushed its data from the caches) overlaps the
  // layer's compute instead of idling the workers. Without workers the task runs before launch()
  // returns. Its return value is kept for sync().
  void launch(std::function<int()> task) {
    if (int err = sync()) task_error_ = err;  // kept for the next sync
    enqueue(std::move(task));
  }

  void enqueue(std::function<int()> task) {
    if (workers_.empty()) {
      if (int err = task()) task_error_ = err;
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_.push_back(std::move(task));
      task_running_.store(true, std::memory_order_release);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
  }

  // Whether a launched task has not finished yet.
  bool task_pending() const { return task_running_.load(std::memory_order_acquire); }

  // Waits until the launched task (if any) is done, working on its parallel regions meanwhile;
  // returns the first non-zero value a task returned since the last sync (0: none).
  int sync() {
    uint64_t joined = 0;  // the epoch of the last region this thread joined or found empty
    for (int spins = 0; task_running_.load(std::memory_order_acquire); ++spins) {
      Job *job = nullptr;
      if (epoch_.load(std::memory_order_acquire) != joined) {
        std::lock_guard<std::mutex> lock(mutex_);
        joined = epoch_.load(std::memory_order_acquire);
        job = current_;
        if (job) job->refs.fetch_add(1, std::memory_order_acq_rel);
      }
      if (job) {
        (*job->fn)();
        job->refs.fetch_sub(1, std::memory_order_acq_rel);
        spins = 0;
      } else if (spins < 4096) {
        cpu_relax();
      } else {
        sched_yield();
      }
    }
    const int err = task_error_;
    task_error_ = 0;
    return err;
  }

  ~Pool() {
    sync();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto &w : workers_) w.join();
  }

 private:
  struct Job {
    const std::function<void()> *fn;
    std::atomic<int> refs{0};
  };
  static void cpu_relax() {
#ifdef __AVX2__
    _mm_pause();
#endif
  }
  void loop(int index) {
    uint64_t seen = 0;
    bool queued = false;  // the first worker: tasks were left in the queue
    for (;;) {
      for (int spins = 0; !queued && epoch_.load(std::memory_order_acquire) == seen && spins < 20000; ++spins)
        cpu_relax();
      Job *job;
      std::function<int()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        const auto has_task = [&] { return index == 0 && !tasks_.empty(); };
        cv_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen || has_task(); });
        seen = epoch_.load(std::memory_order_acquire);
        if (stop_) return;
        if (has_task()) {
          task = std::move(tasks_.front());
          tasks_.pop_front();
        }
        job = task ? nullptr : current_;
        if (job) job->refs.fetch_add(1, std::memory_order_acq_rel);
      }
      if (task) {
        const int err = task();
        std::lock_guard<std::mutex> lock(mutex_);
        if (err && !task_error_) task_error_ = err;
        queued = !tasks_.empty();
        if (!queued) task_running_.store(false, std::memory_order_release);
        continue;
      }
      if (job) {
        (*job->fn)();
        job->refs.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex call_mutex_, mutex_;
  std::condition_variable cv_;
  std::atomic<uint64_t> epoch_{0};
  Job *current_ = nullptr;
  bool stop_ = false;
  std::deque<std::function<int()>> tasks_;  // posted by launch() / enqueue(), run in order by the first worker
  std::atomic<bool> task_running_{false};   // until the queue is empty and its last task done
  int task_error_ = 0;  // the first failure, written by the tasks' thread before task_running_ is released
};

// An op's entry point, run as the pool's task (Pool::launch) on a copy of its arguments: MindSpore
// owns the arrays it passes only for the call. Returns once launched; the task's failure is
// returned by the next op's sync.
using OpEntry = int (*)(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes);

// Reused from task to task: a decode step's ops must not allocate (a 4 KiB malloc in a step measured
// ~50 us: glibc first consolidates the small chunks MindSpore's runtime has freed).
struct OpArgs {
  std::vector<void *> params;
  std::vector<int> ndims;
  std::vector<std::vector<int64_t>> shape_values;
  std::vector<int64_t *> shapes;
  std::vector<std::string> dtype_names;
  std::vector<const char *> dtypes;
  std::vector<std::vector<char>> copies;  // inputs copied at the call (own_input)
  size_t copied = 0;
  void assign(int n, void **p, const int *nd, int64_t **sh, const char **dt) {
    params.assign(p, p + n), ndims.assign(nd, nd + n);
    shape_values.resize(n), shapes.resize(n), dtype_names.resize(n), dtypes.resize(n);
    for (int i = 0; i < n; ++i) {
      shape_values[i].assign(sh[i], sh[i] + nd[i]);
      shapes[i] = shape_values[i].data();
      dtype_names[i] = dt[i];
      dtypes[i] = dtype_names[i].c_str();
    }
    copied = 0;
  }
  // The task reads its own copy of input i ([bytes]): for an input whose memory MindSpore may
  // hand to a later op's output before the task has read it.
  void own_input(int i, size_t bytes) {
    if (copies.size() == copied) copies.emplace_back();
    const char *from = static_cast<const char *>(params[i]);
    copies[copied].assign(from, from + bytes);
    params[i] = copies[copied++].data();
  }
  int run(OpEntry entry) { return entry((int)params.size(), params.data(), ndims.data(), shapes.data(), dtypes.data()); }
};

// Runs the op as the pool's task: after waiting for the tasks before it, or (wait_for_previous
// false) queued behind them. `prepare` may copy inputs (OpArgs::own_input) before the op returns.
inline int launch_op(OpEntry entry, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                     bool wait_for_previous = true, void (*prepare)(OpArgs &) = nullptr) {
  static std::shared_ptr<OpArgs> slots[4];  // a slot is free when no queued task holds it
  static std::mutex launching;
  std::lock_guard<std::mutex> lock(launching);
  if (wait_for_previous) {
    if (int err = Pool::get().sync()) return err;
  }
  std::shared_ptr<OpArgs> *slot = nullptr;
  for (auto &s : slots) {
    if (!s) s = std::make_shared<OpArgs>();
    if (s.use_count() == 1) {
      slot = &s;
      break;
    }
  }
  if (!slot) {  // four tasks queued: wait for them
    if (int err = Pool::get().sync()) return err;
    slot = &slots[0];
  }
  std::shared_ptr<OpArgs> args = *slot;
  args->assign(nparam, params, ndims, shapes, dtypes);
  if (prepare) prepare(*args);
  Pool::get().enqueue([entry, args] { return args->run(entry); });
  return 0;
}

// fn(begin, end) over [0, n), claimed dynamically by the pool's threads in guided chunks: each
// claim takes 1/(2 x threads) of what is left, rounded down to a multiple of `chunk` and at least
// `chunk`. Early claims are long sequential streams (each jump to another part of a weight
// restarts the hardware prefetcher); the last ones are short, so threads finish together.
// Measured against fixed 64-row chunks: bf16 decode 4.5% faster, fp32 unchanged.
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, F fn) {
  chunk = std::max<int64_t>(1, chunk);
  if (n <= chunk) {
    if (n > 0) fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t parts = 2 * Pool::get().size();
  Pool::get().run([&] {
    int64_t begin = next.load(std::memory_order_relaxed), size = 0;
    for (;;) {
      do {
        if (begin >= n) return;
        size = std::max(chunk, (n - begin) / parts / chunk * chunk);
      } while (!next.compare_exchange_weak(begin, begin + size, std::memory_order_relaxed));
      fn(begin, std::min(n, begin + size));
      begin = next.load(std::memory_order_relaxed);
    }
  });
}

// Weights a GEMV streams are moved onto 2 MiB pages the first time a kernel sees them
// (defined in runtime.cc). Decode reads every weight once per token: with 4 KiB pages each
// 4 KiB row of a weight costs a TLB miss and restarts the hardware prefetcher (measured here:
// ~5% more bandwidth with huge pages; llama.cpp gets them from the page cache of its mmap).
// Best effort: no-op where the kernel lacks MADV_COLLAPSE (Linux < 6.1) or refuses it, and
// when MINDCPM_HUGE_PAGES=off.
extern "C" void mindcpm_prefer_huge_pages(const void *data, size_t bytes);

// y = x / sqrt(mean(x^2) + eps) * g over one row of H fp32 values (RmsNorm, and the norm the
// linear kernel applies before its projection).
inline void rms_norm_row(const float *x, const float *g, float eps, int64_t H, float *y) {
  float ss = 0.f;
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / (float)H + eps);
  for (int64_t i = 0; i < H; ++i) y[i] = x[i] * inv * g[i];
}

inline int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

enum class WType { kF32, kBF16, kF16, kOther };
inline WType weight_type(const char *dtype) {
  if (std::strcmp(dtype, "float32") == 0) return WType::kF32;
  if (std::strcmp(dtype, "bfloat16") == 0) return WType::kBF16;
  if (std::strcmp(dtype, "float16") == 0) return WType::kF16;
  return WType::kOther;
}

}  // namespace mindcpm
