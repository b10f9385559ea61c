// The CPU kernels' shared runtime: the one thread pool of the process (see cpu_common.h).
// Built once into its own library, which every op library links.
#include "cpu_common.h"

extern "C" mindcpm::Pool &mindcpm_shared_pool() {
  static mindcpm::Pool pool(mindcpm::num_threads());
  return pool;
}
