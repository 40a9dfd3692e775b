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

}  // namespace jsc
