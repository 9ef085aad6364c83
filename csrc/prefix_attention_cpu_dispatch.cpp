// Picks the CPU backend build (prefix_attention_cpu.cpp and few_row_linear_cpu.cpp, compiled once per ISA)
// that this CPU runs: the widest of avx512 / avx2 / base, or the one named by set_isa (tests run each
// build they can), and its tiles on this machine (Tiles): the micro-tile height by a few milliseconds of timing the
// first time the build runs, the L2 size from the C library.
#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

#include "few_row_linear.h"
#include "prefix_attention.h"

namespace fastmem {
namespace pa {
namespace cpu {

#define FASTMEM_DECLARE_ISA(isa)                      \
  namespace isa {                                     \
  void forward(const Params& p, const Tiles& tiles);  \
  void backward(const Params& p, const Tiles& tiles); \
  std::vector<int> micro_row_choices();               \
  double time_micro_rows(int micro_rows, int reps);   \
  void few_row_linear(const LinearArgs& a);           \
  }
FASTMEM_DECLARE_ISA(base)
#ifdef FASTMEM_CPU_HAS_AVX2
FASTMEM_DECLARE_ISA(avx2)
#endif
#ifdef FASTMEM_CPU_HAS_AVX512
FASTMEM_DECLARE_ISA(avx512)
#endif
#undef FASTMEM_DECLARE_ISA

namespace {

struct Build {
  const char* name;
  void (*forward)(const Params&, const Tiles&);
  void (*backward)(const Params&, const Tiles&);
  std::vector<int> (*micro_row_choices)();
  double (*time_micro_rows)(int, int);
  void (*few_row_linear)(const LinearArgs&);
  bool runs_here;
};

bool cpu_has(const char* feature) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  const std::string f(feature);
  if (f == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (f == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  (void)feature;
#endif
  return false;
}

// Widest first.
const std::vector<Build>& builds() {
  static const std::vector<Build> all = {
#ifdef FASTMEM_CPU_HAS_AVX512
      {"avx512", &avx512::forward, &avx512::backward, &avx512::micro_row_choices, &avx512::time_micro_rows,
       &avx512::few_row_linear, cpu_has("avx512")},
#endif
#ifdef FASTMEM_CPU_HAS_AVX2
      {"avx2", &avx2::forward, &avx2::backward, &avx2::micro_row_choices, &avx2::time_micro_rows,
       &avx2::few_row_linear, cpu_has("avx2")},
#endif
      {"base", &base::forward, &base::backward, &base::micro_row_choices, &base::time_micro_rows,
       &base::few_row_linear, true},
  };
  return all;
}

const Build* best() {
  for (const Build& b : builds())
    if (b.runs_here) return &b;
  return &builds().back();
}

const Build*& active() {
  static const Build* chosen = best();
  return chosen;
}

// L2 per core from the C library (glibc reads CPUID); 256 KiB, the smallest L2 of an AVX2 x86, where
// it cannot tell.
int64_t l2_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (size > 0) return size;
#endif
  return 256 * 1024;
}

// The micro-tile height that multiplies fastest here: each choice timed in 5 alternating rounds of 20
// tile products (about 5 ms in all), the least thread CPU time of its rounds kept (a round another
// process interrupts only loses); a tie keeps the first, smaller choice.
int fastest_micro_rows(const Build& b) {
  const std::vector<int> choices = b.micro_row_choices();
  std::vector<double> best_s(choices.size(), 1e30);
  for (size_t c = 0; c < choices.size(); ++c) b.time_micro_rows(choices[c], 5);  // warm-up
  for (int round = 0; round < 5; ++round)
    for (size_t c = 0; c < choices.size(); ++c) best_s[c] = std::min(best_s[c], b.time_micro_rows(choices[c], 20));
  return choices[std::min_element(best_s.begin(), best_s.end()) - best_s.begin()];
}

// The build's tiles, chosen the first time it is asked for.
const Tiles& tiles_of(const Build& b) {
  static std::mutex mutex;
  static std::vector<std::pair<const Build*, Tiles>> chosen;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : chosen)
    if (entry.first == &b) return entry.second;
  chosen.reserve(builds().size());  // never reallocates: references handed out stay valid
  chosen.emplace_back(&b, Tiles{fastest_micro_rows(b), l2_bytes()});
  return chosen.back().second;
}

}  // namespace

std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (const Build& b : builds())
    if (b.runs_here) names.push_back(b.name);
  return names;
}

std::string isa() { return active()->name; }

void set_isa(const std::string& name) {
  for (const Build& b : builds()) {
    if (name == b.name) {
      if (!b.runs_here) throw std::invalid_argument("this CPU cannot run the " + name + " build");
      active() = &b;
      return;
    }
  }
  std::string known;
  for (const Build& b : builds()) known += std::string(known.empty() ? "" : ", ") + b.name;
  throw std::invalid_argument("unknown CPU build '" + name + "' (built: " + known + ")");
}

Tiles tiles() { return tiles_of(*active()); }

void forward(const Params& p) { active()->forward(p, tiles_of(*active())); }
void backward(const Params& p) { active()->backward(p, tiles_of(*active())); }
void few_row_linear(const LinearArgs& a) { active()->few_row_linear(a); }

}  // namespace cpu
}  // namespace pa
}  // namespace fastmem
