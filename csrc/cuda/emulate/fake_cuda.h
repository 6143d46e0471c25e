// Just enough of CUDA to compile gated_retrieval_kernels.cuh as host code and run its kernels on a CPU, for
// testing without a GPU (tests/test_gpu_emulated.py). Each CUDA thread of a block is a fiber (ucontext) on one OS
// thread; __syncthreads and __shfl_xor_sync are barriers at which a fiber yields until every thread of its block
// (or warp) has arrived; __shared__ arrays are function statics, which is right because blocks run one after
// another. Deterministic, single-threaded, and not a performance model of anything.
#pragma once

#define NEURALDB_CUDA_EMULATION 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
struct float2 {
  float x, y;
};
struct __half2 {
  uint16_t x, y;
};
struct __nv_bfloat162 {
  uint16_t x, y;
};

inline uint3 threadIdx;  // of the fiber that runs now
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline float2 __half22float2(__half2 h) {
  return {c10::detail::fp16_ieee_to_fp32_value(h.x), c10::detail::fp16_ieee_to_fp32_value(h.y)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {c10::detail::f32_from_bits(h.x), c10::detail::f32_from_bits(h.y)};
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
using std::max;
using std::min;

namespace emu {

// A barrier for `expected` fibers: arrive, then yield until the last one has arrived.
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

struct Fiber {
  ucontext_t ctx{};
  std::unique_ptr<char[]> stack;
  unsigned tid = 0;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Barrier> warps;
  Barrier all;
  std::vector<uint64_t> slots;  // one shuffle value per thread
  std::function<void()> body;
  ucontext_t scheduler{};
  Fiber* running = nullptr;
};

inline Block* current = nullptr;
constexpr size_t kStack = 256 * 1024;

inline void yield() { swapcontext(&current->running->ctx, &current->scheduler); }

inline void arrive_and_wait(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

inline void fiber_entry() {
  current->body();
  current->running->done = true;
  // returning resumes uc_link, the scheduler
}

// Runs kernel(args...) over the grid, one block at a time; a block's threads are fibers run round-robin until each
// finishes or waits at a barrier (1-D blocks only).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        current = &b;
        b.fibers.resize(block.x);
        b.warps.resize((block.x + 31) / 32);
        for (unsigned w = 0; w < b.warps.size(); ++w) b.warps[w].expected = std::min(32u, block.x - 32 * w);
        b.all.expected = block.x;
        b.slots.resize(block.x);
        b.body = [&] { kernel(args...); };
        for (unsigned tx = 0; tx < block.x; ++tx) {
          Fiber& f = b.fibers[tx];
          f.tid = tx;
          f.stack.reset(new char[kStack]);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        blockIdx = {bx, by, bz};
        for (unsigned live = block.x; live > 0;) {
          live = 0;
          for (Fiber& f : b.fibers) {
            if (f.done) continue;
            b.running = &f;
            threadIdx = {f.tid, 0, 0};
            swapcontext(&b.scheduler, &f.ctx);
            live += f.done ? 0 : 1;
          }
        }
        current = nullptr;
      }
}

}  // namespace emu

inline void __syncthreads() { emu::arrive_and_wait(emu::current->all); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  emu::Block& b = *emu::current;
  const unsigned tid = threadIdx.x;
  emu::Barrier& bar = b.warps[tid / 32];
  std::memcpy(&b.slots[tid], &v, sizeof(T));
  emu::arrive_and_wait(bar);
  T r;
  std::memcpy(&r, &b.slots[tid / 32 * 32 + ((tid % 32) ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  emu::arrive_and_wait(bar);
  // threadIdx is the scheduler's global: after a yield it is set back to this fiber's before resuming.
  return r;
}
