// Picks the CPU backend build (prefix_attention_cpu.cpp compiled once per ISA) that this CPU runs:
// the widest of avx512 / avx2 / base, or the one named by set_isa (tests run each build they can).
#include <stdexcept>
#include <string>
#include <vector>

#include "prefix_attention.h"

namespace fastmem {
namespace pa {
namespace cpu {

#define FASTMEM_DECLARE_ISA(isa)     \
  namespace isa {                    \
  void forward(const Params& p);     \
  void backward(const Params& p);    \
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
  void (*forward)(const Params&);
  void (*backward)(const Params&);
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
      {"avx512", &avx512::forward, &avx512::backward, cpu_has("avx512")},
#endif
#ifdef FASTMEM_CPU_HAS_AVX2
      {"avx2", &avx2::forward, &avx2::backward, cpu_has("avx2")},
#endif
      {"base", &base::forward, &base::backward, true},
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

void forward(const Params& p) { active()->forward(p); }
void backward(const Params& p) { active()->backward(p); }

}  // namespace cpu
}  // namespace pa
}  // namespace fastmem
