// What the native CPU kernels (conv_cpu.cc, search_cpu.cc) share: the x86 switch for
// their instruction-set variants, and their threads (how many, and a fork-join over
// them). Every kernel splits its work so that each output element is written by one
// thread in a fixed order: results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JSC_X86 1  // variants for AVX2 / popcnt, chosen at run time
#endif

namespace jsc {

constexpr int64_t kRowsPerThread = 512;  // below this many rows a thread, fewer threads

// Threads for `work` rows of work, at most `cap`: the hardware threads (capped by
// $JAX_SPARSECONV_CPU_THREADS when set, read once), fewer for small work.
inline int num_threads(int64_t work, int64_t cap) {
  static const int64_t hw = [] {
    const char* env = std::getenv("JAX_SPARSECONV_CPU_THREADS");  // optional cap
    const int64_t n = std::max(1u, std::thread::hardware_concurrency());
    return env != nullptr && std::atoi(env) > 0 ? std::min<int64_t>(n, std::atoi(env)) : n;
  }();
  return int(std::max<int64_t>(1, std::min({hw, cap, work / kRowsPerThread})));
}

// f(t) for t in [0, threads), on that many threads (the caller's included).
template <class F>
void parallel(int threads, const F& f) {
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back([&f, t] { f(t); });
  f(0);
  for (auto& th : pool) th.join();
}

// f(begin, end) over [0, rows) in blocks of `grain` rows, handed to `threads` threads as
// they come free (a thread the OS delays holds up only its current block). Which thread
// runs a block does not change what the block computes.
template <class F>
void parallel_blocks(int threads, int64_t rows, int64_t grain, const F& f) {
  std::atomic<int64_t> next{0};
  parallel(threads, [&](int) {
    for (int64_t b; (b = next.fetch_add(grain, std::memory_order_relaxed)) < rows;)
      f(b, std::min(rows, b + grain));
  });
}

// f(begin, end) over [0, rows) cut into `threads` contiguous ranges, one a thread.
template <class F>
void parallel_rows(int threads, int64_t rows, const F& f) {
  const int64_t per = (rows + threads - 1) / threads;
  parallel(threads, [&](int t) { f(std::min(rows, t * per), std::min(rows, (t + 1) * per)); });
}

// A large output about to be written for the first time: asks the kernel for transparent
// huge pages over the 2 MiB-aligned part of [p, p + bytes) (madvise(MADV_HUGEPAGE); where
// THP is "madvise", the Linux default, a fresh buffer then faults in 2 MiB pages, not
// 4 KiB ones: XLA hands out freshly mapped memory for large buffers on every call, and
// at 4 KiB a page the faults cost more than the memory traffic). Only advice: nothing
// changes when it is refused, and $JAX_SPARSECONV_NO_HUGEPAGES set turns it off.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  static const bool off = std::getenv("JAX_SPARSECONV_NO_HUGEPAGES") != nullptr;
  if (off || bytes < int64_t(4 * kHuge)) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t begin = (a + kHuge - 1) & ~(kHuge - 1), end = (a + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

}  // namespace jsc
