// The CPU kernels' shared runtime: the one thread pool of the process and the huge-page
// bookkeeping of streamed weights (see cpu_common.h).
// Built once into its own library, which every op library links.
#include "cpu_common.h"

#include <unordered_set>

extern "C" mindcpm::Pool &mindcpm_shared_pool() {
  static mindcpm::Pool pool(mindcpm::num_threads());
  return pool;
}

extern "C" void mindcpm_prefer_huge_pages(const void *data, size_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  constexpr int kMadvCollapse = 25;  // MADV_COLLAPSE, Linux 6.1; older headers lack the name
  static const bool enabled = [] {
    const char *env = std::getenv("MINDCPM_HUGE_PAGES");
    return !(env && (std::strcmp(env, "off") == 0 || std::strcmp(env, "0") == 0));
  }();
  if (!enabled || bytes < kHuge) return;
  static std::mutex mutex;
  static std::unordered_set<const void *> seen;  // once per weight, whether it worked or not
  std::lock_guard<std::mutex> lock(mutex);
  if (!seen.insert(data).second) return;
  // Every 2 MiB page the weight touches, its ends included: a collapse keeps the contents of
  // whatever else shares those pages (khugepaged does the same to live memory), and a weight
  // of exactly 2 MiB rarely starts on a boundary.
  uintptr_t begin = reinterpret_cast<uintptr_t>(data) & ~(kHuge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes + kHuge - 1) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void *>(begin), end - begin, kMadvCollapse);
#endif
}
