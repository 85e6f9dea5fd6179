// Fused CPU kernels for flyer's hot element-wise passes (see flyer/kernels/__init__.py).
//
// Each kernel reads its inputs once and writes its outputs once, working row by row in FP32
// scratch that stays in cache; the eager PyTorch code they replace makes one memory pass per
// operation. Inputs are float32, bfloat16 or float16 (the "T" below), computed in FP32 and
// rounded once to T on output. Rows are split across ATen's intra-op thread pool; the GEMM, cache-attention
// and index-score kernels use flyer's own worker threads where torch runs one (Workers, below).
//
// Built with -ffp-contract=off: a * b + c stays two roundings, as in the eager ops, so that the
// combine kernels reproduce index_add_'s sums bit for bit.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

// float32, bfloat16 and float16 only (the FP64 oracle runs in eager PyTorch)
#define FLYER_DISPATCH(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrainElements = 32768;  // elements per task: below this, threads cost more than they save

int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements)); }

// ---- row conversion between T and FP32 scratch --------------------------------------------------
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  using BVec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + BVec::size() <= n; i += BVec::size()) {
    auto [a, b] = at::vec::convert_to_float<T>(BVec::loadu(src + i));
    a.store(dst + i);
    b.store(dst + i + Vec::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);  // round to nearest even, vectorised for bfloat16 and float16
}

template <>
inline void from_float<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
}

// a paged cache as a kernel reads it in place: ``pool`` (N, bs, K) FP32 or BF16 (or, with ``fp8_rows``, uint8:
// DeepSeek's FP8 rows) and the rows' block ``tables`` (B, nb) int64, both on the CPU; ``op`` names the kernel
void check_paged(const at::Tensor& pool, const at::Tensor& tables, const std::string& op, bool fp8_rows = false) {
  check_cpu(pool, (op + " pool").c_str());
  check_cpu(tables, (op + " tables").c_str());
  check_dtype(tables, at::kLong, (op + " tables").c_str());
  TORCH_CHECK(pool.scalar_type() == at::kFloat || pool.scalar_type() == at::kBFloat16 ||
              (fp8_rows && pool.scalar_type() == at::kByte),
              op, " pool: float32 or bfloat16", fp8_rows ? " (or uint8 FP8 rows)" : "", " expected, got ",
              pool.scalar_type());
}

// row b's block ids lo .. hi (its table's entries) name blocks of the pool's N
void check_block_ids(const int64_t* tables, int64_t b, int64_t nb, int64_t lo, int64_t hi, int64_t N,
                     const std::string& op) {
  for (int64_t i = lo; i <= hi; ++i)
    TORCH_CHECK(0 <= tables[b * nb + i] && tables[b * nb + i] < N, op, ": block id ", tables[b * nb + i],
                " outside the pool's ", N, " blocks");
}

// ---- flyer's own worker threads -----------------------------------------------------------------
// ``flyer serve`` runs torch on one thread on a small CPU (a decode step's hundreds of small ops gain
// nothing from more) and splits its few large kernels (the experts' weight streams, prefill GEMMs,
// attention over the cache) over these threads instead. A job is n items claimed one at a time by
// the caller and the workers alike, each from its own contiguous share first, then from the others'
// ends, so a worker that is slow to wake (or descheduled by another process) costs only its absence:
// the caller waits only for items a worker took. A worker spins briefly after each job before
// sleeping: a step's next kernel call usually comes within that time, and waking a sleeping thread
// costs ~0.1 ms on a VM (Python's thread pool paid it on every call). Each item runs on one thread,
// so the results do not depend on how many there are.
class Workers {
 public:
  static Workers& get() {
    static Workers w;
    return w;
  }
  Workers() {
    // a forked child has none of the parent's threads: it forgets them (a joinable std::thread
    // destroyed would abort) and runs every job on its calling thread until resized
    pthread_atfork([] { get().m_.lock(); }, [] { get().m_.unlock(); }, [] {
      Workers& w = get();
      w.m_.unlock();
      new std::vector<std::thread>(std::move(w.threads_));  // leaked on purpose
      w.threads_.clear();
    });
  }
  ~Workers() { resize(1); }
  int size() const { return static_cast<int>(threads_.size()) + 1; }
  int64_t worker_items() const { return worker_items_.load(std::memory_order_relaxed); }

  // n threads in all (n - 1 workers); a worker spins ``spin`` after a job before it sleeps. Not
  // while jobs run (flyer sets it up before it computes).
  void resize(int n, std::chrono::nanoseconds spin = std::chrono::nanoseconds(0)) {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    stop_ = false;
    spin_ = spin;
    for (int i = 1; i < n; ++i) threads_.emplace_back([this, i] { loop(i); });
  }

  // fn(i, i + 1) for every i in [0, n), on whichever thread claims i. Thread t (the caller is 0)
  // runs its own share of the items in order, so its weight stream runs on through item boundaries
  // and its prefetches land on its own next item (items claimed from one counter interleaved the
  // threads' streams: 5 layers' experts at 1-8 rows each, streamed from memory on two threads, ran
  // 10-20% slower, two builds in one process); a thread done with its share takes the others'
  // remaining items from their ends.
  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    TORCH_CHECK(n < (int64_t{1} << 32), "Workers::run: too many items (", n, ")");
    auto job = std::make_shared<Job>(fn, n, size());
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(*job, 0);  // the caller's own share
    for (int64_t spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < kSpins) pause(); else std::this_thread::yield();  // a worker finishing an item it took
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  static constexpr int64_t kSpins = 1 << 12;  // pause loops (about 0.1 ms) before the caller yields its core

  // a share [begin, end) of the items in one word: claimed from the front by its owner, from the back by others
  struct Share {
    std::atomic<uint64_t> span{0};
    static uint64_t pack(uint64_t b, uint64_t e) { return b | (e << 32); }
  };

  struct Job {
    Job(const std::function<void(int64_t, int64_t)>& f, int64_t n_, int t_) : fn(f), n(n_), t(t_), shares(t_) {
      for (int i = 0; i < t; ++i) shares[i].span.store(Share::pack(n * i / t, n * (i + 1) / t));
    }
    const std::function<void(int64_t, int64_t)>& fn;  // the caller's: alive until every claimed item is done
    const int64_t n;
    const int t;
    std::vector<Share> shares;
    std::atomic<int64_t> done{0};
    std::mutex error_m;
    std::exception_ptr error;
  };

  static void pause() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    _mm_pause();
#endif
  }

  // the next item of share s: its first if front, else its last; -1 when it is empty
  static int64_t claim(Share& s, bool front) {
    uint64_t v = s.span.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t b = v & 0xffffffffu, e = v >> 32;
      if (b >= e) return -1;
      const uint64_t next = front ? Share::pack(b + 1, e) : Share::pack(b, e - 1);
      if (s.span.compare_exchange_weak(v, next, std::memory_order_relaxed))
        return static_cast<int64_t>(front ? b : e - 1);
    }
  }

  // claims and runs items until none is left (its own share first, from thread ``me``); returns how many ran
  static int64_t work(Job& j, int me) {
    int64_t ran = 0;
    for (int k = 0; k < j.t; ++k) {
      Share& s = j.shares[(me + k) % j.t];
      for (int64_t i; (i = claim(s, k == 0)) >= 0; ++ran) {
        try {
          j.fn(i, i + 1);
        } catch (...) {
          std::lock_guard<std::mutex> lk(j.error_m);
          if (!j.error) j.error = std::current_exception();
        }
        j.done.fetch_add(1, std::memory_order_release);
      }
    }
    return ran;
  }

  void loop(int me) {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // spin, yielding the core to any other runnable thread (the HTTP side's, a client's) after
      // the first few hundred checks, then sleep
      const auto until = std::chrono::steady_clock::now() + spin_;
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
        if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
        if (i < 512) pause(); else std::this_thread::yield();
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_acquire) != seen; });
        if (stop_) return;
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
      }
      // jobs run where torch runs one thread: this thread's OpenMP and MKL (a GEMM block's BLAS) too
      if (at::get_num_threads() != 1) at::init_num_threads();
      // a job its caller already finished has no item left: nothing of it runs
      worker_items_.fetch_add(job->t > me ? work(*job, me) : 0, std::memory_order_relaxed);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> worker_items_{0};
  std::chrono::nanoseconds spin_{0};
  bool stop_ = false;
};

// One thread's estimated seconds for a call, from the weight (or cache) bytes it streams and its
// FP32 arithmetic (rates of the slower CPUs measured: bench/cpu_kernels.py); a call of less than
// ``g_split_seconds`` runs on its calling thread alone.
double g_split_seconds = 20e-6;
double one_thread_seconds(double bytes, double flops) { return bytes / 10e9 + flops / 40e9; }

// fn(begin, end) over [0, n): on flyer's workers where torch runs one thread and the work pays for
// them (``seconds``: one_thread_seconds), else on ATen's intra-op threads. fn runs once per item on
// the workers, so its per-call scratch is thread_local rather than allocated each call.
void parallel_items(int64_t n, double seconds, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Workers& w = Workers::get();
  if (w.size() > 1 && at::get_num_threads() == 1) {
    if (seconds >= g_split_seconds && n > 1)
      w.run(n, fn);
    else
      fn(0, n);
    return;
  }
  at::parallel_for(0, n, 1, fn);
}

// flyer's worker threads (the caller's one included) and the least work split over them
void set_threads(int64_t n, double split_seconds, double spin_seconds) {
  TORCH_CHECK(n >= 1, "set_threads: n must be >= 1, got ", n);
  Workers::get().resize(static_cast<int>(n), std::chrono::nanoseconds(static_cast<int64_t>(spin_seconds * 1e9)));
  g_split_seconds = split_seconds;
}

int64_t threads() { return Workers::get().size(); }
int64_t worker_items() { return Workers::get().worker_items(); }

// ---- cross-entropy chunk ------------------------------------------------------------------------
// logits (n, V) -> log p(target) (n,) in FP32 and, with grad, softmax - onehot (n, V) in T.
std::vector<at::Tensor> xent_chunk(const at::Tensor& logits, const at::Tensor& target, bool grad) {
  check_cpu(logits, "xent_chunk logits");
  check_cpu(target, "xent_chunk target");
  TORCH_CHECK(logits.dim() == 2, "xent_chunk: logits (n, V) expected");
  check_dtype(target, at::kLong, "xent_chunk target");
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(target.numel() == n, "xent_chunk: ", n, " targets expected, got ", target.numel());
  TORCH_CHECK(V > 0, "xent_chunk: no classes");
  auto logp_t = at::empty({n}, logits.options().dtype(at::kFloat));
  auto dlogits = grad ? at::empty_like(logits) : at::Tensor();
  const int64_t* tgt = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)  // before any work: an out-of-range target is an error, as in gather
    TORCH_CHECK(tgt[i] >= 0 && tgt[i] < V, "xent_chunk: target ", tgt[i], " out of range for ", V, " classes");
  FLYER_DISPATCH(logits.scalar_type(), "xent_chunk", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* dx = grad ? dlogits.data_ptr<scalar_t>() : nullptr;
    float* lp = logp_t.data_ptr<float>();
    at::parallel_for(0, n, grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(V);
      float* b = buf.data();
      for (int64_t r = begin; r < end; ++r) {
        to_float(x + r * V, b, V);
        const float mx = at::vec::reduce_all<float>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, b, V);
        const float x_t = b[tgt[r]];
        Vec vsum(0.f), vmx(mx);
        int64_t i = 0;
        // a row whose max is not finite (+inf, NaN) runs std::exp throughout: exp_u20 clamps NaN away (inf - inf
        // would give a huge term, not the NaN log_softmax gives the whole row)
        if (std::isfinite(mx))
          for (; i + Vec::size() <= V; i += Vec::size()) {
            Vec e = (Vec::loadu(b + i) - vmx).exp_u20();
            e.store(b + i);
            vsum = vsum + e;
          }
        float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, vsum);
        for (; i < V; ++i) {
          b[i] = std::exp(b[i] - mx);
          sum += b[i];
        }
        const float lp_t = x_t - mx - std::log(sum);
        lp[r] = lp_t;
        if (grad) {
          const Vec vinv(1.f / sum);
          int64_t j = 0;
          for (; j + Vec::size() <= V; j += Vec::size()) (Vec::loadu(b + j) * vinv).store(b + j);
          for (; j < V; ++j) b[j] *= 1.f / sum;
          b[tgt[r]] = std::expm1(lp_t);  // p_t - 1 without cancellation
          from_float(b, dx + r * V, V);
        }
      }
    });
  });
  return {logp_t, dlogits};
}

// ---- SwiGLU -------------------------------------------------------------------------------------
// h13 (N, 2F) = [h1 | h3] -> silu(h1) * h3 (N, F)
at::Tensor swiglu(const at::Tensor& h13) {
  check_cpu(h13, "swiglu h13");
  TORCH_CHECK(h13.dim() == 2 && h13.size(1) % 2 == 0, "swiglu: h13 (N, 2F) expected");
  const int64_t N = h13.size(0), F = h13.size(1) / 2;
  auto a = at::empty({N, F}, h13.options());
  FLYER_DISPATCH(h13.scalar_type(), "swiglu", [&] {
    const scalar_t* h = h13.data_ptr<scalar_t>();
    scalar_t* out = a.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(3 * F), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * F);
      float* h1 = buf.data();
      float* h3 = h1 + F;
      for (int64_t r = begin; r < end; ++r) {
        to_float(h + r * 2 * F, h1, 2 * F);
        int64_t i = 0;
        const Vec one(1.f);
        for (; i + Vec::size() <= F; i += Vec::size()) {
          Vec v1 = Vec::loadu(h1 + i);
          (v1 / (one + v1.neg().exp_u20()) * Vec::loadu(h3 + i)).store(h1 + i);
        }
        for (; i < F; ++i) h1[i] = h1[i] / (1.f + std::exp(-h1[i])) * h3[i];
        from_float(h1, out + r * F, F);
      }
    });
  });
  return a;
}

// da (N, F), h13 (N, 2F) -> d h13 (N, 2F): [da * h3 * silu'(h1) | da * silu(h1)]
at::Tensor swiglu_backward(const at::Tensor& da, const at::Tensor& h13) {
  check_cpu(da, "swiglu_backward da");
  check_cpu(h13, "swiglu_backward h13");
  TORCH_CHECK(h13.dim() == 2 && da.dim() == 2 && h13.size(0) == da.size(0) && h13.size(1) == 2 * da.size(1),
              "swiglu_backward: da (N, F) and h13 (N, 2F) expected");
  TORCH_CHECK(da.scalar_type() == h13.scalar_type(), "swiglu_backward: da and h13 dtypes differ");
  const int64_t N = da.size(0), F = da.size(1);
  auto dh13 = at::empty_like(h13);
  FLYER_DISPATCH(h13.scalar_type(), "swiglu_backward", [&] {
    const scalar_t* h = h13.data_ptr<scalar_t>();
    const scalar_t* g = da.data_ptr<scalar_t>();
    scalar_t* out = dh13.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(5 * F), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(3 * F);
      float* h1 = buf.data();
      float* h3 = h1 + F;
      float* d = h3 + F;
      for (int64_t r = begin; r < end; ++r) {
        to_float(h + r * 2 * F, h1, 2 * F);
        to_float(g + r * F, d, F);
        int64_t i = 0;
        const Vec one(1.f);
        for (; i + Vec::size() <= F; i += Vec::size()) {
          Vec v1 = Vec::loadu(h1 + i), v3 = Vec::loadu(h3 + i), vd = Vec::loadu(d + i);
          Vec s = one / (one + v1.neg().exp_u20());
          (vd * v3 * s * (one + v1 * (one - s))).store(h1 + i);  // d h1
          (vd * (v1 * s)).store(h3 + i);                          // d h3
        }
        for (; i < F; ++i) {
          const float s = 1.f / (1.f + std::exp(-h1[i]));
          const float d1 = d[i] * h3[i] * s * (1.f + h1[i] * (1.f - s));
          h3[i] = d[i] * (h1[i] * s);
          h1[i] = d1;
        }
        from_float(h1, out + r * 2 * F, 2 * F);
      }
    });
  });
  return dh13;
}

// ---- MoE combine --------------------------------------------------------------------------------
// Rows of token t: rows[offsets[t] : offsets[t + 1]], ascending (index_add_'s order).

void check_csr(const at::Tensor& offsets, const at::Tensor& rows, int64_t n_rows) {
  check_cpu(offsets, "offsets");
  check_cpu(rows, "rows");
  check_dtype(offsets, at::kLong, "offsets");
  check_dtype(rows, at::kLong, "rows");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t T = offsets.numel() - 1;
  TORCH_CHECK(T >= 0 && off[0] == 0 && off[T] <= rows.numel(), "combine: bad row offsets");
  for (int64_t t = 0; t < T; ++t)  // the loops read rows[off[t] .. off[t + 1]): offsets must not decrease
    TORCH_CHECK(off[t] <= off[t + 1], "combine: row offsets decrease at token ", t, " (", off[t], " > ",
                off[t + 1], ")");
  for (int64_t i = 0; i < off[T]; ++i)
    TORCH_CHECK(rw[i] >= 0 && rw[i] < n_rows, "combine: row ", rw[i], " out of range for ", n_rows, " rows");
}

// out (T, D) FP32: out[t] = sum over t's rows r of float(y[r]) * w[r], in row order
at::Tensor combine(const at::Tensor& y, const at::Tensor& w, const at::Tensor& offsets, const at::Tensor& rows) {
  check_cpu(y, "combine y");
  check_cpu(w, "combine w");
  check_dtype(w, at::kFloat, "combine w");
  TORCH_CHECK(y.dim() == 2 && w.numel() == y.size(0), "combine: y (n, D) and w (n,) expected");
  check_csr(offsets, rows, y.size(0));
  const int64_t T = offsets.numel() - 1, D = y.size(1);
  auto out = at::empty({T, D}, y.options().dtype(at::kFloat));
  FLYER_DISPATCH(y.scalar_type(), "combine", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t* rw = rows.data_ptr<int64_t>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, T, grain(4 * D), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(D);
      float* yr = buf.data();
      for (int64_t t = begin; t < end; ++t) {
        float* acc = op + t * D;
        std::fill(acc, acc + D, 0.f);
        for (int64_t k = off[t]; k < off[t + 1]; ++k) {
          const int64_t r = rw[k];
          to_float(yp + r * D, yr, D);
          const Vec vw(wp[r]);
          int64_t i = 0;
          for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(acc + i) + Vec::loadu(yr + i) * vw).store(acc + i);
          for (; i < D; ++i) acc[i] = acc[i] + yr[i] * wp[r];
        }
      }
    });
  });
  return out;
}

// Backward of combine, per row r of token src[r] (src[r] == T: a pad row, all zeros):
// dy[r] = T(g[src[r]] * w[r]) and, with need_dw, dw[r] = <g[src[r]], float(y[r])>.
std::vector<at::Tensor> combine_backward(const at::Tensor& g, const at::Tensor& y, const at::Tensor& w,
                                         const at::Tensor& src, bool need_dw) {
  check_cpu(g, "combine_backward g");
  check_cpu(y, "combine_backward y");
  check_cpu(w, "combine_backward w");
  check_cpu(src, "combine_backward src");
  check_dtype(g, at::kFloat, "combine_backward g");
  check_dtype(w, at::kFloat, "combine_backward w");
  check_dtype(src, at::kLong, "combine_backward src");
  TORCH_CHECK(g.dim() == 2 && y.dim() == 2 && g.size(1) == y.size(1) && w.numel() == y.size(0) &&
                  src.numel() == y.size(0),
              "combine_backward: g (T, D), y (n, D), w (n,), src (n,) expected");
  const int64_t T = g.size(0), n = y.size(0), D = y.size(1);
  const int64_t* sp = src.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] <= T, "combine_backward: token ", sp[r], " out of range for ", T, " tokens");
  auto dy = at::empty_like(y);
  auto dw = need_dw ? at::empty({n}, w.options()) : at::Tensor();
  FLYER_DISPATCH(y.scalar_type(), "combine_backward", [&] {
    const float* gp = g.data_ptr<float>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    scalar_t* dyp = dy.data_ptr<scalar_t>();
    float* dwp = need_dw ? dw.data_ptr<float>() : nullptr;
    at::parallel_for(0, n, grain(4 * D), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * D);
      float* yr = buf.data();
      float* out = yr + D;
      for (int64_t r = begin; r < end; ++r) {
        if (sp[r] == T) {
          std::memset(static_cast<void*>(dyp + r * D), 0, D * sizeof(scalar_t));
          if (need_dw) dwp[r] = 0.f;
          continue;
        }
        const float* gr = gp + sp[r] * D;
        const Vec vw(wp[r]);
        int64_t i = 0;
        for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(gr + i) * vw).store(out + i);
        for (; i < D; ++i) out[i] = gr[i] * wp[r];
        from_float(out, dyp + r * D, D);
        if (need_dw) {
          to_float(yp + r * D, yr, D);
          dwp[r] = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                   [](Vec a, Vec b) { return a + b; }, gr, yr, D);
        }
      }
    });
  });
  return {dy, dw};
}

// out (T, D) in x's dtype: out[t] = sum over t's rows r of x[r] in FP32, rounded once (what
// index_add_ into a zero tensor of x's dtype computes: it accumulates reduced precision in FP32)
at::Tensor segment_sum(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& rows) {
  check_cpu(x, "segment_sum x");
  TORCH_CHECK(x.dim() == 2, "segment_sum: x (n, D) expected");
  check_csr(offsets, rows, x.size(0));
  const int64_t T = offsets.numel() - 1, D = x.size(1);
  auto out = at::empty({T, D}, x.options());
  FLYER_DISPATCH(x.scalar_type(), "segment_sum", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t* rw = rows.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(4 * D), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * D);
      float* acc = buf.data();
      float* xr = acc + D;
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc, acc + D, 0.f);
        for (int64_t k = off[t]; k < off[t + 1]; ++k) {
          to_float(xp + rw[k] * D, xr, D);
          int64_t i = 0;
          for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(acc + i) + Vec::loadu(xr + i)).store(acc + i);
          for (; i < D; ++i) acc[i] = acc[i] + xr[i];
        }
        from_float(acc, op + t * D, D);
      }
    });
  });
  return out;
}

// ---- RMSNorm ------------------------------------------------------------------------------------
// x (M, D) -> y = x * r * weight in out_dtype, r = 1 / sqrt(mean(x^2) + eps) (M,) in FP32
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  check_cpu(x, "rms_norm x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm: x (M, D), weight (D,) expected");
  const int64_t M = x.size(0), D = x.size(1);
  auto wf = weight.to(at::kFloat).contiguous();
  auto y = at::empty({M, D}, x.options().dtype(out_dtype));
  auto r = at::empty({M}, x.options().dtype(at::kFloat));
  FLYER_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    using in_t = scalar_t;
    FLYER_DISPATCH(out_dtype, "rms_norm_out", [&] {
      const in_t* xp = x.data_ptr<in_t>();
      const float* wp = wf.data_ptr<float>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      float* rp = r.data_ptr<float>();
      at::parallel_for(0, M, grain(3 * D), [&](int64_t begin, int64_t end) {
        std::vector<float> buf(D);
        float* b = buf.data();
        for (int64_t m = begin; m < end; ++m) {
          to_float(xp + m * D, b, D);
          const float ss = at::vec::map_reduce_all<float>([](Vec a) { return a * a; },
                                                           [](Vec a, Vec c) { return a + c; }, b, D);
          const float rm = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
          rp[m] = rm;
          const Vec vr(rm);
          int64_t i = 0;
          for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(b + i) * vr * Vec::loadu(wp + i)).store(b + i);
          for (; i < D; ++i) b[i] = b[i] * rm * wp[i];
          from_float(b, yp + m * D, D);
        }
      });
    });
  });
  return {y, r};
}

// Gradients of rms_norm: with xhat = x * r and g' = g * weight,
// dx = r * (g' - xhat * mean(g' * xhat)) in x's dtype, dweight = sum over rows of g * xhat (FP32).
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& r, bool need_dx, bool need_dw) {
  check_cpu(g, "rms_norm_backward g");
  check_cpu(x, "rms_norm_backward x");
  check_cpu(r, "rms_norm_backward r");
  check_dtype(r, at::kFloat, "rms_norm_backward r");
  TORCH_CHECK(x.dim() == 2 && g.sizes() == x.sizes() && weight.numel() == x.size(1) && r.numel() == x.size(0),
              "rms_norm_backward: g, x (M, D), weight (D,), r (M,) expected");
  const int64_t M = x.size(0), D = x.size(1);
  auto wf = weight.to(at::kFloat).contiguous();
  auto dx = need_dx ? at::empty_like(x) : at::Tensor();
  // rows split into a fixed number of blocks, whatever the thread count; each block sums its own dweight part,
  // and the parts are added in block order (no races, and the same result on any number of threads)
  constexpr int64_t kDwBlocks = 64;
  const int64_t n_blocks = std::max<int64_t>(1, std::min<int64_t>(M, kDwBlocks));
  auto dw_parts = need_dw ? at::zeros({n_blocks, D}, x.options().dtype(at::kFloat)) : at::Tensor();
  FLYER_DISPATCH(x.scalar_type(), "rms_norm_backward", [&] {
    using in_t = scalar_t;
    FLYER_DISPATCH(g.scalar_type(), "rms_norm_backward_g", [&] {
      const in_t* xp = x.data_ptr<in_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const float* wp = wf.data_ptr<float>();
      const float* rp = r.data_ptr<float>();
      in_t* dxp = need_dx ? dx.data_ptr<in_t>() : nullptr;
      float* parts = need_dw ? dw_parts.data_ptr<float>() : nullptr;
      at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> buf(3 * D);
        float* xh = buf.data();
        float* gf = xh + D;
        float* gw = gf + D;
        for (int64_t blk = b0; blk < b1; ++blk) {
          float* dwp = need_dw ? parts + blk * D : nullptr;
          for (int64_t m = blk * M / n_blocks; m < (blk + 1) * M / n_blocks; ++m) {
            to_float(xp + m * D, xh, D);
            to_float(gp + m * D, gf, D);
            const Vec vr(rp[m]);
            Vec vdot(0.f);
            int64_t i = 0;
            for (; i + Vec::size() <= D; i += Vec::size()) {
              Vec xv = Vec::loadu(xh + i) * vr, gv = Vec::loadu(gf + i);
              xv.store(xh + i);
              Vec gwv = gv * Vec::loadu(wp + i);
              gwv.store(gw + i);
              vdot = vdot + gwv * xv;
              if (dwp) (Vec::loadu(dwp + i) + gv * xv).store(dwp + i);
            }
            float dot = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, vdot);
            for (; i < D; ++i) {
              xh[i] = xh[i] * rp[m];
              gw[i] = gf[i] * wp[i];
              dot += gw[i] * xh[i];
              if (dwp) dwp[i] = dwp[i] + gf[i] * xh[i];
            }
            if (!need_dx) continue;
            const float c = dot / static_cast<float>(D);
            const Vec vc(c);
            i = 0;
            for (; i + Vec::size() <= D; i += Vec::size())
              ((Vec::loadu(gw + i) - Vec::loadu(xh + i) * vc) * vr).store(gw + i);
            for (; i < D; ++i) gw[i] = (gw[i] - xh[i] * c) * rp[m];
            from_float(gw, dxp + m * D, D);
          }
        }
      });
    });
  });
  if (!need_dw) return {dx, at::Tensor()};
  float* parts = dw_parts.data_ptr<float>();  // block 0's row collects the others', in block order
  for (int64_t blk = 1; blk < n_blocks; ++blk) {
    const float* p = parts + blk * D;
    int64_t i = 0;
    for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(parts + i) + Vec::loadu(p + i)).store(parts + i);
    for (; i < D; ++i) parts[i] = parts[i] + p[i];
  }
  return {dx, dw_parts[0]};
}


// ---- grouped GEMM for few rows per group (routed experts while decoding) ------------------------
// x (R, K) rows sorted by group, counts (G,) rows per group, w (G, N, K) -> out (R, N) with
// out[r] = w[g] x[r] for each row r of group g. A decode step gives each expert a few rows: one
// GEMM-library call per expert then costs more in call overhead and small-M kernels than reading
// its weights. Here each weight row is streamed once for all of its group's rows, in blocks of
// kRows rows by kWeightBlock weight rows whose dot products stay in registers (one load of each
// operand vector serves several FMAs), and (group, block of weight rows) tasks are split across
// threads. Groups of more than max_rows rows run as BLAS GEMMs on blocks of weight rows widened to
// FP32 (gemm_block). x is FP32; w FP32, BF16 (weights held at half the bytes for serving: each
// widens exactly to FP32 in a register, so the sums are those of the FP32 kernel on w.float()), or
// FP8 E4M3 with its 128x128 block scales.
// Each output is summed in the same order whatever the blocking.
// rows of one group sharing each weight row load, by weight rows per register block: 4 x 4
// accumulators fit AVX-512's 32 registers, 6 x 2 AVX2's 16 (against 4 x 2: a weight read 3 times
// for 16 rows, not 4; 1.1-1.6x at 5-24 rows per expert in cache: docs/performance.md)
constexpr int64_t kRows = Vec::size() >= 16 ? 4 : 6;
constexpr int64_t kWeightRows = 32;  // weight rows per task
constexpr int kWeightBlock = Vec::size() >= 16 ? 4 : 2;

// Weight rows to prefetch ahead (two register blocks): one core streaming weights from memory
// stalls on each block's first lines without it (measured: one layer's 32 BF16 experts at one row,
// out of cache, 2.3 ms without against 1.5 ms with); further ahead measured no better.
constexpr int64_t kPrefetchRows = 2 * kWeightBlock;

inline Vec load_weights(const float* p) { return Vec::loadu(p); }

// a BF16 value is the top half of the FP32 with the same value: widen each lane and shift
inline Vec load_weights(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  float buf[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) buf[i] = static_cast<float>(p[i]);
  return Vec::loadu(buf);
#endif
}

// FP8 E4M3 codes widened exactly to FP32, each divided by 256: a code sign-extended to 16 bits,
// shifted left by 7 and with bit 14 (the code's own sign bit, shifted) cleared is the FP16 with the
// same sign, exponent and mantissa bits, whose value is the code's over 2^8 (FP16's exponent bias is
// 15, E4M3's 7; subnormal codes are FP16 subnormals), and the hardware widens FP16 exactly. With
// ``kNaN`` the NaN codes (all ones but the sign) are NaN; without, they widen to +-1.875: held
// weights have none (``flyer.infer.weights`` refuses them), and the GEMM saves 3 of its ~9
// instructions a vector, a quarter of its time where the weights are in cache.
template <bool kNaN = true>
inline Vec load_fp8_over_256(const c10::Float8_e4m3fn* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(-0x4001));
  const __m512 v = _mm512_cvtph_ps(h);
  if constexpr (!kNaN) return Vec(v);
  const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
  return Vec(_mm512_mask_blend_ps(nan, v, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN())));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(-0x4001));
  const __m256 v = _mm256_cvtph_ps(h);
  if constexpr (!kNaN) return Vec(v);
  const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x3F80)), _mm_set1_epi16(0x3F80));
  return Vec(_mm256_blendv_ps(v, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                              _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan))));
#else
  float buf[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) buf[i] = static_cast<float>(p[i]) / 256.f;
  return Vec::loadu(buf);
#endif
}

// AVX2: FP8 E4M3 codes times 2^-120 in 3 instructions, against the FP16 route's 5 (6 uops on AMD's Zen: its cvtph takes
// two; experts of 1-4 rows streamed on one thread 1.22-1.26x faster): a code sign-extended to 32 bits, shifted left by
// 20 and masked to bit 31 and bits 26..20 is the FP32 with the code's sign, its 4 exponent bits as the low ones of
// FP32's 8 and its 3 mantissa bits on top: the code's value over 2^120 (FP32's exponent bias is 127, E4M3's 7),
// exactly. A subnormal code gives an FP32 subnormal, which a CPU with denormals-are-zero on (torch.set_flush_denormal)
// reads as 0, and 2^120 times a scale of 256 or more overflows: grouped_mm takes this route only where neither
// happens. NaN codes widen to +-480 / 2^120 (held weights have none).
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kFP8Raw = true;
inline Vec load_fp8_over_2p120(const c10::Float8_e4m3fn* p) {
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return Vec(_mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20),
                                                  _mm256_set1_epi32(static_cast<int>(0x87F00000u)))));
}
#else
constexpr bool kFP8Raw = false;  // AVX-512's FP16 route is 4 instructions; the scalar build has no vectors
inline Vec load_fp8_over_2p120(const c10::Float8_e4m3fn* p) { return load_fp8_over_256<false>(p) * Vec(0x1p-112f); }
#endif
constexpr float kTwoP120 = 0x1p120f;

// Denormals-are-zero, this thread's MXCSR bit (torch.set_flush_denormal(True) sets it with
// flush-to-zero): operands below FP32's smallest normal read as 0 in arithmetic
inline bool denormals_are_zero() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return _mm_getcsr() & 0x0040;
#else
  return false;
#endif
}

// How dot_block reads a weight row: as it is stored (FP32, or BF16 widened), or as FP8 codes
// times their 128x128 block's FP32 scale (DeepSeek's checkpoint format; no NaN codes), multiplied
// in a register before the FMA: the product the eager dequantisation rounds to, so the sums are
// the FP32 kernel's on the dequantized weights. ``scales`` is the (K / 128) scales of the rows' block.
struct Unscaled {
  template <typename W>
  Vec vec(const W* p, int64_t) const { return load_weights(p); }
  template <typename W>
  float one(const W* p, int64_t) const { return static_cast<float>(*p); }
  Unscaled rows(int64_t) const { return *this; }
};
// (code / 256) * (256 scale), or (code / 2^120) * (2^120 scale) with ``kRaw``, is exactly code *
// scale before its one rounding, so it rounds alike. ``wide``: the scales times 256 (2^120), made
// once per call. 256 scale overflows from 2^120: a call with a scale of 2^100 or more takes ``kLarge``,
// whose such blocks keep ``wide`` = scale and compute ((code / 256) scale) 256, as exact (a power-of-two
// factor commutes with the rounding where nothing under- or overflows midway).
enum FP8Route { kBy256, kRaw, kLarge };
constexpr float kLargeScale = 0x1p100f;  // decode_fp8_scaled's bound
template <int kRoute>
struct BlockScaled {
  const float* scales;  // (blocks of rows, Kb): the weight's block scales
  const float* wide;  // the same, times the widening's factor
  int64_t kb;
  Vec vec(const c10::Float8_e4m3fn* p, int64_t k) const {
    if constexpr (kRoute == kLarge) {
      const Vec v = load_fp8_over_256<false>(p) * Vec(wide[k / 128]);
      return std::abs(scales[k / 128]) < kLargeScale ? v : v * Vec(256.f);
    }
    return (kRoute == kRaw ? load_fp8_over_2p120(p) : load_fp8_over_256<false>(p)) * Vec(wide[k / 128]);
  }
  float one(const c10::Float8_e4m3fn* p, int64_t k) const { return static_cast<float>(*p) * scales[k / 128]; }
  BlockScaled rows(int64_t n) const {  // weight row n's block
    const int64_t b = (n / 128) * kb;
    return {scales + b, wide + b, kb};
  }
};

// Keeps a row's x vector in a register for its NW FMAs: GCC otherwise folds the load into each of
// them, reading it NW times, and a step of M x NW FMAs then waits on its loads (AVX2, 16 registers)
inline void in_register(Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  asm("" : "+x"(r));
  v = r;
#endif
}

template <int M, int NW, typename W, typename L>
inline void dot_block(const W* w, const L& load, const float* x, int64_t K, int64_t N, float* out, int64_t n) {
  Vec acc[M][NW];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NW; ++j) acc[m][j] = Vec(0.f);
  const auto step = [&](int64_t k) {
    Vec wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = load.vec(w + j * K + k, k);
    for (int m = 0; m < M; ++m) {
      Vec xv = Vec::loadu(x + m * K + k);
      in_register(xv);
      for (int j = 0; j < NW; ++j) acc[m][j] = at::vec::fmadd(wv[j], xv, acc[m][j]);
    }
  };
  // one prefetch per 64-byte line of each weight row (a prefetch per vector took load slots the
  // FMAs' operands needed: 2-4 per line of BF16 or FP8)
  constexpr int64_t V = Vec::size(), U = std::max<int64_t>(1, 64 / static_cast<int64_t>(sizeof(W)) / V);
  int64_t k = 0;
  for (; k + U * V <= K; k += U * V) {
    for (int j = 0; j < NW; ++j) __builtin_prefetch(w + (j + kPrefetchRows) * K + k);
    for (int64_t u = 0; u < U; ++u) step(k + u * V);
  }
  for (; k + V <= K; k += V) step(k);
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < NW; ++j) {
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[m][j]);
      for (int64_t i = k; i < K; ++i) sum += load.one(w + j * K + i, i) * x[m * K + i];
      out[m * N + n + j] = sum;
    }
  }
}

// Weight rows per register block for M rows of W: kWeightBlock, but 4 for one or two rows against
// FP8 on AVX2, where 2 x 1 or 2 x 2 chains of FMAs left the widening's latency exposed (a layer of
// 2-row experts streamed on one thread: 1.05 against 0.70 ms; BF16 and FP32 gained nothing)
template <int M, typename W>
constexpr int row_block() {
  return Vec::size() < 16 && M <= 2 && std::is_same_v<W, c10::Float8_e4m3fn> ? 4 : kWeightBlock;
}

// a register block never straddles two 128-row scale blocks: tasks start at multiples of
// kWeightRows, and it and every row_block divide 128
static_assert(128 % kWeightRows == 0 && kWeightRows % 4 == 0 && kWeightRows % kWeightBlock == 0,
              "weight row tasks must tile 128-row blocks");

// not inlined into run_items, where GCC kept AVX2's 4 x 2 accumulators on the stack, each FMA a
// store and a reload (FP8 experts of 4 rows, 8 layers streamed on two threads: 1.5 against 0.94 ms a layer)
template <int M, typename W, typename L>
__attribute__((noinline)) void dot_rows(const W* w, const L& load, const float* x, int64_t K, int64_t N, float* out,
                                        int64_t n0, int64_t n1) {
  constexpr int NW = row_block<M, W>();
  int64_t n = n0;
  for (; n + NW <= n1; n += NW) dot_block<M, NW>(w + n * K, load.rows(n), x, K, N, out, n);
  for (; n < n1; ++n) dot_block<M, 1>(w + n * K, load.rows(n), x, K, N, out, n);
}

// fn(std::integral_constant<int, m>{}): a group's row count, 1 <= m <= kRows, as a template argument
template <typename F>
inline void with_rows(int64_t m, const F& fn) {
  static_assert(kRows <= 6, "with_rows dispatches up to 6 rows");
  switch (m) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    default: return fn(std::integral_constant<int, 6>{});
  }
}

template <typename W, typename L>
inline void dot_rows_of_group(const W* w, const L& load, const float* xp, float* op, int64_t r0, int64_t r1,
                              int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t r = r0; r < r1; r += kRows) {
    const float* xr = xp + r * K;
    float* o = op + r * N;
    with_rows(std::min(kRows, r1 - r), [&](auto M) { dot_rows<decltype(M)::value>(w, load, xr, K, N, o, n0, n1); });
  }
}

// M rows against nb (<= kWeightBlock) widened weight rows, the outputs' columns n .. n + nb (not
// inlined, as dot_rows)
template <int M>
__attribute__((noinline)) void dot_widened(const float* wide, int64_t nb, const float* x, int64_t K, int64_t N,
                                           float* out, int64_t n) {
  if (nb == kWeightBlock) {
    dot_block<M, kWeightBlock>(wide, Unscaled{}, x, K, N, out, n);
    return;
  }
  for (int64_t j = 0; j < nb; ++j) dot_block<M, 1>(wide + j * K, Unscaled{}, x, K, N, out, n + j);
}

// The BLAS's FP32 GEMM that torch itself links (column-major, Fortran interface), looked up at run
// time: ATen's own cpublas::gemm is not exported to extensions, and its ops would need the caller's
// thread-local state (inference mode) on flyer's workers. nullptr where torch has none (a plain loop
// runs instead); tests turn it off to check that loop (set_blas).
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
SgemmFn find_sgemm() {
  if (void* f = dlsym(RTLD_DEFAULT, "sgemm_")) return reinterpret_cast<SgemmFn>(f);
  if (void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD))  // loaded without RTLD_GLOBAL
    if (void* f = dlsym(torch_cpu, "sgemm_")) return reinterpret_cast<SgemmFn>(f);
  return nullptr;
}
SgemmFn found_sgemm() {
  static const SgemmFn fn = find_sgemm();
  return fn;
}
bool use_blas = true;
SgemmFn blas_sgemm() { return use_blas ? found_sgemm() : nullptr; }

// the kernels' GEMMs on torch's BLAS where found (on), or on their plain loops (off: tests)
void set_blas(bool on) { use_blas = on; }
bool has_blas() { return found_sgemm() != nullptr; }

// c (column-major m x n, ld ldc) = alpha op(a) op(b) + beta c
void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (SgemmFn fn = blas_sgemm()) {
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    fn(ta ? "T" : "N", tb ? "T" : "N", &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      float sum = 0.f;
      for (int64_t p = 0; p < k; ++p) sum += (ta ? a[i * lda + p] : a[p * lda + i]) * (tb ? b[p * ldb + j] : b[j * ldb + p]);
      c[j * ldc + i] = alpha * sum + (beta == 0.f ? 0.f : beta * c[j * ldc + i]);
    }
}

// a weight row widened (FP8: dequantized) into FP32 by its loader
template <typename W, typename L>
inline void widen_row(const W* wr, const L& ln, float* dst, int64_t K) {
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) ln.vec(wr + k, k).store(dst + k);
  for (; k < K; ++k) dst[k] = ln.one(wr + k, k);
}

// Groups of more rows than grouped_mm's max_rows: one GEMM on torch's BLAS per block of kGemmRows
// weight rows, the block widened (dequantized) into FP32 scratch by the kernel's own loader, so on the
// values of the widened weight. Blocks of a fixed size, whatever the threads: the same sums on any count.
constexpr int64_t kGemmRows = 128;  // a whole FP8 scale block

// one unit of grouped_mm's work: a task of the kernel (``gemm`` false: kWeightRows weight rows of a
// group of few rows) or a GEMM block (kGemmRows weight rows of a larger group)
struct Item {
  int64_t g, n0;
  bool gemm;
};

struct GroupedCall {
  const at::Tensor &x, &w;
  at::Tensor& out;
  const std::vector<int64_t>& first;  // group g's rows: first[g] .. first[g + 1]
  const std::vector<Item>& items;
  int64_t K, N;
};

template <typename W, typename L>
void gemm_block(const GroupedCall& c, const W* wg, const L& lg, int64_t g, int64_t n0) {
  const int64_t K = c.K, N = c.N, nb = std::min(kGemmRows, N - n0), r0 = c.first[g], rows = c.first[g + 1] - r0;
  const float* wb = reinterpret_cast<const float*>(wg) + n0 * K;  // FP32 w: its own rows
  if constexpr (!std::is_same_v<W, float>) {
    thread_local std::vector<float> buf;
    buf.resize(nb * K);
    const auto ln = lg.rows(n0);  // n0 is a multiple of 128: one scale block for all the rows
    for (int64_t j = 0; j < nb; ++j) widen_row(wg + (n0 + j) * K, ln, buf.data() + j * K, K);
    wb = buf.data();
  }
  const float* xr = c.x.data_ptr<float>() + r0 * K;
  float* o = c.out.data_ptr<float>() + r0 * N + n0;
  if (blas_sgemm())  // out rows (row-major, ld N) = x rows . wb^T: column-major, wb^T x^T
    sgemm(true, false, nb, rows, K, 1.f, wb, K, xr, K, 0.f, o, N);
  else  // the kernel's own loop on the widened rows
    dot_rows_of_group(wb, Unscaled{}, xr, o, 0, rows, K, N, 0, nb);
}

// ``load(g)``: group g's weight loader. A weight row is read once per kRows rows of its group; a
// group of more rows than that, with weights that cost more to widen than BF16's shift (FP8 through
// FP16: AVX-512), widens each register block of weight rows once into FP32 scratch (in L1) and runs
// the FP32 dot products on it: the same values, so the same sums. AVX2's 3-instruction widening
// does better without (5 to 32 rows per expert, one thread: 1.1-2.0x). Runs items [begin, end).
template <typename W, typename LoadOf>
void run_items(const GroupedCall& c, const W* wp, const LoadOf& load, int64_t begin, int64_t end) {
  constexpr bool widen_once = std::is_same_v<W, c10::Float8_e4m3fn> && !kFP8Raw;
  const float* xp = c.x.data_ptr<float>();
  float* op = c.out.data_ptr<float>();
  const int64_t K = c.K, N = c.N;
  thread_local std::vector<float> wide;
  if constexpr (widen_once) wide.resize(kWeightBlock * K);
  for (int64_t t = begin; t < end; ++t) {
    const auto [g, n0, gemm] = c.items[t];
    const W* wg = wp + g * N * K;
    const auto lg = load(g);
    if (gemm) {
      gemm_block(c, wg, lg, g, n0);
      continue;
    }
    const int64_t n1 = std::min(n0 + kWeightRows, N);
    if (!widen_once || c.first[g + 1] - c.first[g] <= kRows) {
      dot_rows_of_group(wg, lg, xp, op, c.first[g], c.first[g + 1], K, N, n0, n1);
      continue;
    }
    if constexpr (widen_once) {
      for (int64_t n = n0; n < n1; n += kWeightBlock) {
        const int64_t nb = std::min<int64_t>(kWeightBlock, n1 - n);
        const auto ln = lg.rows(n);
        for (int64_t j = 0; j < nb; ++j) widen_row(wg + (n + j) * K, ln, wide.data() + j * K, K);
        for (int64_t r = c.first[g]; r < c.first[g + 1]; r += kRows) {
          const float* xr = xp + r * K;
          float* o = op + r * N;
          with_rows(std::min(kRows, c.first[g + 1] - r),
                    [&](auto M) { dot_widened<decltype(M)::value>(wide.data(), nb, xr, K, N, o, n); });
        }
      }
    }
  }
}

// out (R, N): each group's consecutive rows of x (cnt[g] of them) times w[g]^T; groups of at most
// max_rows rows on the kernel (a weight row read once per kRows rows), larger ones on the BLAS
// (gemm_block). ``scale``: undefined, or for FP8 w (G, N, K) its block scales (G, ceil(N / 128),
// ceil(K / 128)). Items split over flyer's workers (parallel_items).
at::Tensor grouped_rows(const at::Tensor& x, const int64_t* cnt, const at::Tensor& w, int64_t max_rows,
                        const c10::optional<at::Tensor>& scale) {
  check_cpu(x, "grouped_mm x");
  check_cpu(w, "grouped_mm w");
  check_dtype(x, at::kFloat, "grouped_mm x");
  const bool fp8 = w.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || fp8,
              "grouped_mm w: float32, bfloat16 or float8_e4m3fn expected, got ", w.scalar_type());
  TORCH_CHECK(fp8 == (scale.has_value() && scale->defined()),
              "grouped_mm: float8_e4m3fn w takes its block scales, and no other w does");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == x.size(1), "grouped_mm: x (R, K), w (G, N, K) expected");
  const int64_t R = x.size(0), K = x.size(1), G = w.size(0), N = w.size(1);
  std::vector<int64_t> first(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(cnt[g] >= 0, "grouped_mm: negative count");
    first[g + 1] = first[g] + cnt[g];
  }
  TORCH_CHECK(first[G] == R, "grouped_mm: counts sum to ", first[G], ", x has ", R, " rows");
  auto out = at::empty({R, N}, x.options());
  if (K == 0) return out.zero_();  // empty sums; the BLAS refuses a leading dimension of 0 and writes nothing
  std::vector<Item> items;  // the GEMM blocks first: the largest items, so the last ones run short
  double bytes = 0;
  for (int64_t g = 0; g < G; ++g)
    if (cnt[g] > max_rows) {
      for (int64_t n = 0; n < N; n += kGemmRows) items.push_back({g, n, true});
      bytes += N * K * 4.;
    }
  for (int64_t g = 0; g < G; ++g)
    if (cnt[g] > 0 && cnt[g] <= max_rows) {
      for (int64_t n = 0; n < N; n += kWeightRows) items.push_back({g, n, false});
      bytes += N * K * w.element_size();
    }
  const double seconds = one_thread_seconds(bytes, 2. * R * N * K);
  const GroupedCall call{x, w, out, first, items, K, N};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const auto unscaled = [](int64_t) { return Unscaled{}; };
  if (fp8) {
    const at::Tensor& sc = *scale;
    check_cpu(sc, "grouped_mm scale");
    check_dtype(sc, at::kFloat, "grouped_mm scale");
    const int64_t nb = (N + 127) / 128, kb = (K + 127) / 128;
    TORCH_CHECK(sc.dim() == 3 && sc.size(0) == G && sc.size(1) == nb && sc.size(2) == kb && sc.is_contiguous(),
                "grouped_mm scale: contiguous (", G, ", ", nb, ", ", kb, ") expected for w (", G, ", ", N, ", ", K,
                ")");
    const float* sp = sc.data_ptr<float>();
    // the 2^-120 route only where 2^120 scale stays finite; each route's scales times its factor, once
    bool raw = kFP8Raw, large = false;
    for (int64_t i = 0; i < sc.numel(); ++i) raw = raw && std::abs(sp[i]) < 256.f;
    for (int64_t i = 0; i < sc.numel(); ++i) large = large || std::abs(sp[i]) >= kLargeScale;
    std::vector<float> by256(sc.numel()), by2p120(raw ? sc.numel() : 0);
    for (int64_t i = 0; i < sc.numel(); ++i) by256[i] = std::abs(sp[i]) < kLargeScale ? 256.f * sp[i] : sp[i];
    for (size_t i = 0; i < by2p120.size(); ++i) by2p120[i] = kTwoP120 * sp[i];
    const auto run = [&](auto route, const float* by, int64_t begin, int64_t end) {
      const auto load = [&](int64_t g) {
        return BlockScaled<decltype(route)::value>{sp + g * nb * kb, by + g * nb * kb, kb};
      };
      run_items(call, w.data_ptr<c10::Float8_e4m3fn>(), load, begin, end);
    };
    parallel_items(n_items, seconds, [&](int64_t begin, int64_t end) {
      if (large)
        run(std::integral_constant<int, kLarge>{}, by256.data(), begin, end);
      else if (raw && !denormals_are_zero())  // this thread's MXCSR: subnormal codes need it off
        run(std::integral_constant<int, kRaw>{}, by2p120.data(), begin, end);
      else
        run(std::integral_constant<int, kBy256>{}, by256.data(), begin, end);
    });
  } else if (w.scalar_type() == at::kBFloat16) {
    parallel_items(n_items, seconds, [&](int64_t begin, int64_t end) {
      run_items(call, w.data_ptr<c10::BFloat16>(), unscaled, begin, end);
    });
  } else {
    parallel_items(n_items, seconds, [&](int64_t begin, int64_t end) {
      run_items(call, w.data_ptr<float>(), unscaled, begin, end);
    });
  }
  return out;
}

// counts (G,) int64: group g's rows of x
at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& w, int64_t max_rows,
                      const c10::optional<at::Tensor>& scale) {
  check_cpu(counts, "grouped_mm counts");
  check_dtype(counts, at::kLong, "grouped_mm counts");
  TORCH_CHECK(w.dim() == 3 && counts.numel() == w.size(0), "grouped_mm: counts (G,) for w (G, N, K) expected");
  return grouped_rows(x, counts.data_ptr<int64_t>(), w, max_rows, scale);
}

// F.linear of x (..., K) on w (N, K) (FP32, BF16, or FP8 with its (ceil(N / 128), ceil(K / 128))
// block scales) computed in FP32 as one group of grouped_mm, plus bias: one call from Python, where a
// decode step makes ~40 of them and each Python-side reshape and check costs microseconds
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& scale, int64_t max_rows) {
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "linear: x (..., K) and w (N, K) expected, got ",
              x.sizes(), " and ", w.sizes());
  // the row count from x's leading dims: reshape cannot infer -1 beside K = 0
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2 = x.reshape({rows, w.size(1)}).contiguous();
  c10::optional<at::Tensor> scale3;
  if (scale.has_value() && scale->defined()) scale3 = scale->contiguous().unsqueeze(0);
  at::Tensor out = grouped_rows(x2, &rows, w.contiguous().unsqueeze(0), max_rows, scale3);
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(w.size(0));
  return out.view(shape);
}

// ---- argmax of each row -------------------------------------------------------------------------
// out (R,) int64: each row of x (R, V) FP32's index of its largest value, the first on ties and
// the first NaN where the row has one: torch.argmax's answer. torch's CPU argmax compares one value
// at a time along the row (0.34 ms for a 16-request step's 16 x 8,192 logits on AVX2, against
// 0.02 ms for amax); here the row's max is found in vectors (NaN propagates), then its first index.
// the largest of x[0 .. n), n > 0; NaN where one is NaN
inline float max_of(const float* x, int64_t n) {
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  float top = x[0];
  if (n >= W) {
    Vec m = Vec::loadu(x);
    for (j = W; j + W <= n; j += W) m = at::vec::maximum(m, Vec::loadu(x + j));  // maximum propagates NaN
    top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  }
  for (; j < n; ++j) top = std::isnan(top) || std::isnan(x[j]) ? std::numeric_limits<float>::quiet_NaN()
                                                                : std::max(top, x[j]);
  return top;
}

int64_t row_argmax(const float* x, int64_t V) {
  constexpr int64_t W = Vec::size();
  const float top = max_of(x, V);
  const bool nan = std::isnan(top);
  const Vec t(top);
  int64_t j = 0;
  for (; j + W <= V; j += W) {  // zero_mask: the lanes whose comparison is false
    const Vec v = Vec::loadu(x + j);
    const int miss = (nan ? v.isnan() : v == t).zero_mask();
    if (miss != (1 << W) - 1) return j + __builtin_ctz(~miss);
  }
  for (; j < V; ++j)
    if (nan ? std::isnan(x[j]) : x[j] == top) return j;
  return 0;  // not reached: top is one of the row's values
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_cpu(x, "argmax_rows x");
  check_dtype(x, at::kFloat, "argmax_rows x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.is_contiguous(), "argmax_rows: contiguous x (R, V), V > 0 expected");
  const int64_t R = x.size(0), V = x.size(1);
  auto out = at::empty({R}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) op[r] = row_argmax(xp + r * V, V);
  return out;
}

// ---- absorbed MLA decode attention over a paged latent cache -------------------------------------
// q (B, M, K) FP32: row m = h T + t, the absorbed query [q_nope W_UK | q_rope] of head h and new
// token t; pool (N, bs, K) FP32 or BF16: [latent | rope key] of every cache slot, in blocks of bs
// slots, or (N, bs, W) uint8: DeepSeek's FP8 rows of the same (flyer/infer/cache_fp8.py; FP8Rows below);
// tables (B, nb) int64: row b's slot s lives at pool[tables[b][s / bs]][s % bs]; pos (B, T)
// int64: query (b, m) attends slots first .. pos[b][m % T] (first > 0 where the leading slots hold
// nothing: the server's MTP cache keeps position p in slot p + 1). out (B, M, C) FP32 =
// softmax_s(scale q . kv_s) kv_s[:C], in one pass over each row's slots (flash decoding): the eager
// path gathers every slot into a new tensor per layer, then runs two matmuls and a masked softmax
// over the (M x S) scores. Here a tile of slots is read once (widened to FP32) for all M rows, its
// two products on the kernel's register blocks (a few rows) or torch's BLAS; each row keeps a running
// max, sum and (C) output. Weights below FP32's smallest normal are flushed to zero, as the eager
// path's softmax flushes its probabilities: subnormal arithmetic is slow and each such term is below
// the sum's rounding.
constexpr int64_t kSlotTile = 64;

// o (rows, C) += wts (rows, n) tile[:, :C] (n slots, ld K), rows <= kRows: each tile vector loaded
// once for every row, the outputs of 2 vectors per row kept in registers over the tile's slots
template <int MR>
__attribute__((noinline)) void accumulate_rows(const float* wts, int64_t n, const float* tile, int64_t K, int64_t C,
                                               float* o) {
  constexpr int64_t V = Vec::size();
  int64_t c = 0;
  for (; c + 2 * V <= C; c += 2 * V) {
    Vec acc[MR][2];
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = Vec::loadu(o + m * C + c);
      acc[m][1] = Vec::loadu(o + m * C + c + V);
    }
    for (int64_t j = 0; j < n; ++j) {
      const Vec t0 = Vec::loadu(tile + j * K + c), t1 = Vec::loadu(tile + j * K + c + V);
      for (int m = 0; m < MR; ++m) {
        const Vec wm(wts[m * n + j]);
        acc[m][0] = at::vec::fmadd(wm, t0, acc[m][0]);
        acc[m][1] = at::vec::fmadd(wm, t1, acc[m][1]);
      }
    }
    for (int m = 0; m < MR; ++m) {
      acc[m][0].store(o + m * C + c);
      acc[m][1].store(o + m * C + c + V);
    }
  }
  for (; c + V <= C; c += V) {
    Vec acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = Vec::loadu(o + m * C + c);
    for (int64_t j = 0; j < n; ++j) {
      const Vec t = Vec::loadu(tile + j * K + c);
      for (int m = 0; m < MR; ++m) acc[m] = at::vec::fmadd(Vec(wts[m * n + j]), t, acc[m]);
    }
    for (int m = 0; m < MR; ++m) acc[m].store(o + m * C + c);
  }
  for (; c < C; ++c)
    for (int m = 0; m < MR; ++m) {
      float sum = o[m * C + c];
      for (int64_t j = 0; j < n; ++j) sum += wts[m * n + j] * tile[j * K + c];
      o[m * C + c] = sum;
    }
}

// w[j] = exp(w[j] - top) for j < n, those below FP32's smallest normal set to 0; returns their sum
inline float exp_flushed(float* w, int64_t n, float top) {
  constexpr int64_t V = Vec::size();
  const float tiny = std::numeric_limits<float>::min();
  Vec sum(0.f);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec e = (Vec::loadu(w + j) - Vec(top)).exp();
    const Vec kept = Vec::blendv(e, Vec(0.f), e < Vec(tiny));
    kept.store(w + j);
    sum = sum + kept;
  }
  float tail = 0.f;
  for (; j < n; ++j) {
    const float e = std::exp(w[j] - top);
    w[j] = e < tiny ? 0.f : e;
    tail += w[j];
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum) + tail;
}

// How mla_decode_rows (and index_score_rows) reads a run of consecutive slots into its FP32 tile (K floats a slot):
// a pool of FP32 or BF16 slots widened (PlainRows), or of FP8 rows (FP8Rows; FP8Keys) decoded; the rest of the
// kernel is the same for all.
template <typename P>
struct PlainRows {
  const P* pool;
  int64_t K;
  void load(int64_t slot, int64_t n, float* dst) const { to_float(pool + slot * K, dst, n * K); }
};

// n E4M3 codes (their bytes) times one FP32 scale s into dst, the value the eager dequantization computes (a
// 256-entry table, then the scale), exactly where s is a power of two: whole vectors widen in registers
// (load_fp8_over_256, the held-weight GEMM's; scalar code where the build has no AVX2), s taken times 256, exact
// while that is below 2^100; the rest, and every code under a scale that is not (overflow, inf, NaN), go through
// the table
inline void decode_fp8_scaled(const uint8_t* codes, int64_t n, float s, const float* table, float* dst) {
  constexpr int64_t V = Vec::size();
  int64_t c = 0;
  if (std::abs(s) < 0x1p100f) {
    const Vec wide(256.f * s);
    for (; c + V <= n; c += V)
      (load_fp8_over_256(reinterpret_cast<const c10::Float8_e4m3fn*>(codes + c)) * wide).store(dst + c);
  }
  for (; c < n; ++c) dst[c] = table[codes[c]] * s;
}

// DeepSeek's FP8 rows (flyer/infer/cache_fp8.py): per slot W = C + 4 ceil(C / 128) + 2 R bytes, [C E4M3 codes |
// one FP32 scale per 128 codes | R BF16 rope values], each tile of codes decoded times its power-of-two scale
struct FP8Rows {
  const uint8_t* pool;
  int64_t W, C, R;
  const float* table;  // the 256 E4M3 values by code
  void load(int64_t slot, int64_t n, float* dst) const {
    const int64_t K = C + R, tiles = (C + 127) / 128;
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* row = pool + (slot + i) * W;
      float* d = dst + i * K;
      for (int64_t t = 0; t < tiles; ++t) {
        float s;
        std::memcpy(&s, row + C + 4 * t, sizeof(float));  // a row's scales are 4-byte aligned only where W is
        decode_fp8_scaled(row + 128 * t, std::min<int64_t>(128, C - 128 * t), s, table, d + 128 * t);
      }
      to_float(reinterpret_cast<const c10::BFloat16*>(row + C + 4 * tiles), d + C, R);
    }
  }
};

// DeepSeek's FP8 index keys (flyer/infer/indexer_fp8.py): a slot's K E4M3 codes in ``codes`` (N bs, K) and its
// FP32 scale in ``scales`` (N bs), decoded as FP8Rows decodes a latent tile: code times scale, exactly
struct FP8Keys {
  const uint8_t* codes;
  const float* scales;
  int64_t K;
  const float* table;
  void load(int64_t slot, int64_t n, float* dst) const {
    for (int64_t i = 0; i < n; ++i) decode_fp8_scaled(codes + (slot + i) * K, K, scales[slot + i], table, dst + i * K);
  }
};

// the 256 values of E4M3 codes, by code (NaN codes NaN)
const float* e4m3_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int i = 0; i < 256; ++i)
      t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table.data();
}

template <typename Rows>
void mla_decode_rows(const float* qp, const Rows& rows, const int64_t* tables, const int64_t* pos, float* op,
                     int64_t b0, int64_t b1, int64_t nb, int64_t bs, int64_t T, int64_t M, int64_t K, int64_t C,
                     float scale, int64_t first, int64_t few_rows) {
  const float tiny = std::numeric_limits<float>::min();
  thread_local std::vector<float> tile, sc, mx, l;  // a worker runs this once per row: scratch kept
  tile.resize(kSlotTile * K);
  sc.resize(M * kSlotTile);
  mx.resize(M);
  l.resize(M);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t* pb = pos + b * T;
    const int64_t S = *std::max_element(pb, pb + T) + 1;
    const float* q = qp + b * M * K;
    float* o = op + b * M * C;  // the running (unnormalised) outputs, normalised at the end
    std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.f);
    std::fill(o, o + M * C, 0.f);
    // tiles from slot ``first``: a cache shifted by ``first`` slots gets the same tiles, so the same bits
    for (int64_t s0 = first; s0 < S; s0 += kSlotTile) {
      const int64_t n = std::min(kSlotTile, S - s0);
      for (int64_t j = 0; j < n;) {  // the tile's slots, block by block, as FP32
        const int64_t s = s0 + j, run = std::min(n - j, bs - s % bs);
        rows.load(tables[b * nb + s / bs] * bs + s % bs, run, tile.data() + j * K);
        j += run;
      }
      if (M <= few_rows) {  // scores (M, n) = q (M, K) tile (n, K)^T, scaled
        dot_rows_of_group(tile.data(), Unscaled{}, q, sc.data(), 0, M, K, n, 0, n);
        for (int64_t i = 0; i < M * n; ++i) sc[i] *= scale;
      } else {  // the BLAS is column-major: scores^T = tile q^T
        sgemm(true, false, n, M, K, scale, tile.data(), K, q, K, 0.f, sc.data(), n);
      }
      for (int64_t m = 0; m < M; ++m) {
        float* w = sc.data() + m * n;
        const int64_t nv = std::max<int64_t>(0, std::min(n, pb[m % T] + 1 - s0));  // the slots this query sees
        const float top = std::max(mx[m], nv > 0 ? max_of(w, nv) : mx[m]);
        float alpha = std::exp(mx[m] - top);  // 0 for the first tile (-inf), 1 when the max stays
        if (alpha < tiny) alpha = 0.f;
        if (alpha != 1.f) {
          l[m] *= alpha;
          float* om = o + m * C;
          for (int64_t c = 0; c < C; ++c) om[c] *= alpha;
        }
        mx[m] = top;
        l[m] += exp_flushed(w, nv, top);
        std::fill(w + nv, w + n, 0.f);  // slots past this query's position
      }
      // o (M, C) += weights (M, n) tile[:, :C] (n, C); column-major: o^T += tile[:, :C]^T weights^T
      if (M <= few_rows)
        for (int64_t m = 0; m < M; m += kRows)
          with_rows(std::min(kRows, M - m), [&](auto R) {
            accumulate_rows<decltype(R)::value>(sc.data() + m * n, n, tile.data(), K, C, o + m * C);
          });
      else
        sgemm(false, false, C, M, n, 1.f, tile.data(), K, sc.data(), n, 1.f, o, C);
    }
    for (int64_t m = 0; m < M; ++m) {
      const float inv = 1.f / l[m];
      for (int64_t c = 0; c < C; ++c) o[m * C + c] *= inv;
    }
  }
}

// ``few_rows``: query rows (heads x new tokens) up to which a tile's two products run on the kernel's
// own register blocks rather than the BLAS (flyer.kernels.MLA_FEW_QUERY_ROWS; any count where the BLAS is narrower)
at::Tensor mla_decode(const at::Tensor& q, const at::Tensor& pool, const at::Tensor& tables, const at::Tensor& pos,
                      int64_t C, double scale, int64_t first, int64_t few_rows) {
  check_cpu(q, "mla_decode q");
  check_cpu(pos, "mla_decode pos");
  check_dtype(q, at::kFloat, "mla_decode q");
  check_dtype(pos, at::kLong, "mla_decode pos");
  check_paged(pool, tables, "mla_decode", true);
  // before the modulo below (T = 0 divides by zero) and the max over each row's T positions
  TORCH_CHECK(pos.dim() == 2 && pos.size(1) >= 1, "mla_decode: pos (B, T) with T >= 1 expected, got ", pos.sizes());
  TORCH_CHECK(q.dim() == 3 && pool.dim() == 3 && tables.dim() == 2 && pos.dim() == 2 &&
              tables.size(0) == q.size(0) && pos.size(0) == q.size(0) && q.size(1) % pos.size(1) == 0,
              "mla_decode: q (B, M, K), pool (N, bs, K), tables (B, nb), pos (B, T) with T dividing M expected");
  const int64_t B = q.size(0), M = q.size(1), K = q.size(2), N = pool.size(0), bs = pool.size(1);
  const int64_t nb = tables.size(1), T = pos.size(1);
  TORCH_CHECK(0 < C && C <= K, "mla_decode: C must be in [1, K]");
  const bool fp8 = pool.scalar_type() == at::kByte;
  const int64_t W = fp8 ? C + 4 * ((C + 127) / 128) + 2 * (K - C) : K;  // a slot's width in the pool's elements
  TORCH_CHECK(!fp8 || C % 4 == 0, "mla_decode: FP8 rows need C a multiple of 4 (their FP32 scales follow C bytes)");
  TORCH_CHECK(pool.size(2) == W, "mla_decode: pool slots of ", W, fp8 ? " bytes (FP8 rows of C " : " values (K ",
              fp8 ? C : K, fp8 ? " codes and K - C rope values)" : ")", " expected, got ", pool.size(2));
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  TORCH_CHECK(first >= 0, "mla_decode: first must be >= 0");
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(first <= pp[i] && pp[i] < nb * bs, "mla_decode: position ", pp[i], " outside slots ", first,
                " .. ", nb * bs - 1, " (the first attended to the last the block tables cover)");
  for (int64_t b = 0; b < B; ++b)  // the blocks each row reads
    check_block_ids(tp, b, nb, 0, *std::max_element(pp + b * T, pp + (b + 1) * T) / bs, N, "mla_decode");
  auto out = at::empty({B, M, C}, q.options());
  double slots = 0;  // the slots the rows read, for the split's estimate
  for (int64_t b = 0; b < B; ++b) slots += *std::max_element(pp + b * T, pp + (b + 1) * T) + 1 - first;
  const double seconds = one_thread_seconds(slots * W * pool.element_size(), 2. * slots * M * (K + C));
  const auto run = [&](const auto& rows) {
    parallel_items(B, seconds, [&](int64_t b0, int64_t b1) {
      mla_decode_rows(q.data_ptr<float>(), rows, tp, pp, out.data_ptr<float>(), b0, b1, nb, bs, T, M, K, C,
                      static_cast<float>(scale), first, few_rows);
    });
  };
  if (fp8)
    run(FP8Rows{pool.data_ptr<uint8_t>(), W, C, K - C, e4m3_table()});
  else if (pool.scalar_type() == at::kBFloat16)
    run(PlainRows<c10::BFloat16>{pool.data_ptr<c10::BFloat16>(), K});
  else
    run(PlainRows<float>{pool.data_ptr<float>(), K});
  return out;
}

// ---- DSA indexer scores over a paged index-key cache ---------------------------------------------
// q (B, M, K) FP32: row m = t H + h, new token t's rotated indexer query of head h; w (B, T, H) FP32: each
// token's head weights; pool (N, bs, K) FP32 or BF16: the indexer key of every cache slot in blocks of bs slots,
// row b's slot s at pool[tables[b][s / bs]][s % bs], or (N, bs, K) uint8: DeepSeek's FP8 keys' E4M3 codes, with
// key_scale (N, bs, 1) FP32 their scales (FP8Keys). out (B, T, S), S = n_slots - first:
// out[b, t, s - first] = sum_h w[b, t, h] relu(scale q[b, t H + h] . key_s), the heads summed in order. A tile of
// slots at a time is widened into FP32 scratch (in L1) and scored there; the eager path (Indexer.scores, the
// oracle of flyer.infer.attention.dsa_index_scores) first copies every key into a new FP32 tensor per layer. An
// FP8 key is read as code times its scale: a power of two, it scales each product and sum exactly, so the score is
// fp8_index's k_scale times the sum over the codes (the eager indexer_fp8.index_scores multiplies after).
constexpr int64_t kIndexTile = 128;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kIndex8 = true;
// the lane sums of a[0 .. 7] as one vector: a key's dot product is one short chain (K / 8 FMAs), so eight keys'
// partial sums reduce together in 7 additions' worth of shuffles rather than a reduction each
inline __m256 lane_sums8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// the scores of 8 consecutive FP32 keys (tile, ld K; K a multiple of 8) for one token's H queries q (H, K)
inline void index_scores8(const float* tile, const float* q, const float* w, int64_t H, int64_t K, float scale,
                          float* out) {
  __m256 sum = _mm256_setzero_ps();
  for (int64_t h = 0; h < H; ++h) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 qv = _mm256_loadu_ps(q + h * K + k);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(tile + j * K + k), qv, acc[j]);
    }
    // max(0, x): NaN stays NaN, as torch.relu's
    const __m256 s = _mm256_max_ps(_mm256_setzero_ps(), _mm256_mul_ps(lane_sums8(acc), _mm256_set1_ps(scale)));
    sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_set1_ps(w[h]), s));
  }
  _mm256_storeu_ps(out, sum);
}
#else
constexpr bool kIndex8 = false;
inline void index_scores8(const float*, const float*, const float*, int64_t, int64_t, float, float*) {}
#endif

// one key's score, its sums in plain order (the slots past a multiple of 8, or K not one of 8)
inline float index_score1(const float* key, const float* q, const float* w, int64_t H, int64_t K, float scale) {
  float sum = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    float dot = 0.f;
    for (int64_t k = 0; k < K; ++k) dot += q[h * K + k] * key[k];
    const float s = dot * scale;
    sum += w[h] * (std::isnan(s) ? s : std::max(s, 0.f));
  }
  return sum;
}

template <typename Keys>
void index_score_rows(const float* qp, const float* wp, const Keys& keys, const int64_t* tables, float* op,
                      int64_t b0, int64_t b1, int64_t nb, int64_t bs, int64_t T, int64_t H, int64_t K,
                      int64_t first, int64_t n_slots, float scale) {
  const int64_t S = n_slots - first;
  const bool by8 = kIndex8 && K % 8 == 0;
  thread_local std::vector<float> tile;
  tile.resize(kIndexTile * K);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t s0 = first; s0 < n_slots; s0 += kIndexTile) {
      const int64_t n = std::min(kIndexTile, n_slots - s0);
      for (int64_t j = 0; j < n;) {  // the tile's keys, block run by block run, as FP32
        const int64_t s = s0 + j, run = std::min(n - j, bs - s % bs);
        keys.load(tables[b * nb + s / bs] * bs + s % bs, run, tile.data() + j * K);
        j += run;
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* q = qp + (b * T + t) * H * K;
        const float* w = wp + (b * T + t) * H;
        float* o = op + (b * T + t) * S + (s0 - first);
        int64_t j = 0;
        if (by8)
          for (; j + 8 <= n; j += 8) index_scores8(tile.data() + j * K, q, w, H, K, scale, o + j);
        for (; j < n; ++j) o[j] = index_score1(tile.data() + j * K, q, w, H, K, scale);
      }
    }
  }
}

// the checks and the run both index-score kernels share: q (B, T H, K), w (B, T, H), the pool's (N, bs, ...) blocks
// through tables (B, nb), slot_bytes each, read by ``keys``
template <typename Keys>
at::Tensor index_scores_over(const at::Tensor& q, const at::Tensor& w, const at::Tensor& pool, const at::Tensor& tables,
                             int64_t first, int64_t n_slots, double scale, double slot_bytes, const char* op,
                             const Keys& keys) {
  check_cpu(q, (std::string(op) + " q").c_str());
  check_cpu(w, (std::string(op) + " w").c_str());
  check_dtype(q, at::kFloat, (std::string(op) + " q").c_str());
  check_dtype(w, at::kFloat, (std::string(op) + " w").c_str());
  check_cpu(tables, (std::string(op) + " tables").c_str());
  check_dtype(tables, at::kLong, (std::string(op) + " tables").c_str());
  TORCH_CHECK(q.dim() == 3 && w.dim() == 3 && tables.dim() == 2 && w.size(0) == q.size(0) &&
              q.size(1) == w.size(1) * w.size(2) && tables.size(0) == q.size(0),
              op, ": q (B, T H, K), w (B, T, H), tables (B, nb) expected");
  const int64_t B = q.size(0), K = q.size(2), T = w.size(1), H = w.size(2), N = pool.size(0), bs = pool.size(1);
  const int64_t nb = tables.size(1);
  TORCH_CHECK(0 <= first && first < n_slots && n_slots <= nb * bs, op, ": slots ", first, " .. ", n_slots - 1,
              " outside the ", nb * bs, " the block tables cover");
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)  // the blocks each row reads
    check_block_ids(tp, b, nb, first / bs, (n_slots - 1) / bs, N, op);
  auto out = at::empty({B, T, n_slots - first}, q.options());
  const double slots = static_cast<double>(B) * (n_slots - first);
  const double seconds = one_thread_seconds(slots * slot_bytes, 2. * slots * T * H * (K + 1));
  parallel_items(B, seconds, [&](int64_t b0, int64_t b1) {
    index_score_rows(q.data_ptr<float>(), w.data_ptr<float>(), keys, tp, out.data_ptr<float>(), b0, b1, nb, bs, T, H,
                     K, first, n_slots, static_cast<float>(scale));
  });
  return out;
}

at::Tensor index_scores(const at::Tensor& q, const at::Tensor& w, const at::Tensor& pool, const at::Tensor& tables,
                        int64_t first, int64_t n_slots, double scale, const c10::optional<at::Tensor>& key_scale) {
  const bool fp8 = key_scale.has_value() && key_scale->defined();
  check_paged(pool, tables, "index_scores", fp8);
  TORCH_CHECK(fp8 == (pool.scalar_type() == at::kByte), "index_scores: uint8 (E4M3) keys take their scales, and no "
              "other keys do");
  if (fp8) {
    check_cpu(*key_scale, "index_scores key_scale");
    check_dtype(*key_scale, at::kFloat, "index_scores key_scale");
    TORCH_CHECK(key_scale->numel() == pool.size(0) * pool.size(1), "index_scores: key_scale (N, bs, 1) expected");
  }
  TORCH_CHECK(q.dim() == 3 && pool.dim() == 3 && pool.size(2) == q.size(2), "index_scores: q (B, T H, K), pool (N, bs, "
              "K) expected");
  const int64_t K = q.size(2), slot_bytes = K * pool.element_size() + (fp8 ? 4 : 0);
  if (fp8)
    return index_scores_over(q, w, pool, tables, first, n_slots, scale, slot_bytes, "index_scores",
                             FP8Keys{pool.data_ptr<uint8_t>(), key_scale->data_ptr<float>(), K, e4m3_table()});
  if (pool.scalar_type() == at::kBFloat16)
    return index_scores_over(q, w, pool, tables, first, n_slots, scale, slot_bytes, "index_scores",
                             PlainRows<c10::BFloat16>{pool.data_ptr<c10::BFloat16>(), K});
  return index_scores_over(q, w, pool, tables, first, n_slots, scale, slot_bytes, "index_scores",
                           PlainRows<float>{pool.data_ptr<float>(), K});
}

// DeepSeek-V4's FP4 index keys (flyer/infer/hybrid_index_fp4.py): per slot a row of W = K / 2 + K / 32 bytes,
// [K / 2 bytes of E2M1 codes, channel 2j in the low nibble, 2j + 1 in the high | one UE8M0 byte per 32 channels,
// 2^(byte - 127)], each code's value times its tile's scale: the FP32 product the eager unpack_rows computes (exact
// but past FP32's range), so the scores are the eager scores' but for the order of their sums
struct FP4Rows {
  const uint8_t* pool;
  int64_t W, K;
  const float* values;  // the 16 E2M1 values by code (-0 at 8)
  const float* scales;  // the 256 UE8M0 scales by byte (2^-127 .. 2^127, then inf), as the eager SCALES
  void load(int64_t slot, int64_t n, float* dst) const {
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* row = pool + (slot + i) * W;
      float* d = dst + i * K;
      for (int64_t t = 0; t < K / 32; ++t) decode_tile(row + 16 * t, scales[row[K / 2 + t]], d + 32 * t);
    }
  }
  // 16 code bytes (32 channels) times scale s into d
  void decode_tile(const uint8_t* codes, float s, float* d) const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // the nibbles in channel order, each widened to a lane: magnitude by permute (its low 3 bits), sign bit 3
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)), low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    const __m128i c[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
    const __m256 mag = _mm256_loadu_ps(values), scale = _mm256_set1_ps(s);
    for (int j = 0; j < 4; ++j) {
      const __m256i code = _mm256_cvtepu8_epi32(j % 2 ? _mm_srli_si128(c[j / 2], 8) : c[j / 2]);
      const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(8)), 28));
      _mm256_storeu_ps(d + 8 * j, _mm256_mul_ps(_mm256_xor_ps(_mm256_permutevar8x32_ps(mag, code), sign), scale));
    }
#else
    for (int j = 0; j < 16; ++j) {
      d[2 * j] = values[codes[j] & 15] * s;
      d[2 * j + 1] = values[codes[j] >> 4] * s;
    }
#endif
  }
};

const float* e2m1_table() {
  static const float table[16] = {0.f,  .5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                  -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
  return table;
}

const float* ue8m0_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int i = 0; i < 256; ++i) t[i] = std::ldexp(1.f, i - 127);
    return t;
  }();
  return table.data();
}

// index_scores over DeepSeek-V4's FP4 index keys: pool (N, bs, W) uint8, W = K / 2 + K / 32, K a multiple of 32
at::Tensor index_scores_fp4(const at::Tensor& q, const at::Tensor& w, const at::Tensor& pool, const at::Tensor& tables,
                            int64_t first, int64_t n_slots, double scale) {
  check_cpu(pool, "index_scores_fp4 pool");
  check_dtype(pool, at::kByte, "index_scores_fp4 pool");
  TORCH_CHECK(q.dim() == 3, "index_scores_fp4: q (B, T H, K) expected");
  const int64_t K = q.size(2), W = K / 2 + K / 32;
  TORCH_CHECK(K % 32 == 0 && pool.dim() == 3 && pool.size(2) == W, "index_scores_fp4: pool (N, bs, K / 2 + K / 32) ",
              "rows of K a multiple of 32 expected");
  return index_scores_over(q, w, pool, tables, first, n_slots, scale, static_cast<double>(W), "index_scores_fp4",
                           FP4Rows{pool.data_ptr<uint8_t>(), W, K, e2m1_table(), ue8m0_table()});
}

// ---- FP8 dequantisation: 1x128 tiles (block_rows 1) and 128x128 blocks (block_rows 128) ---------
// (Quantisation stays eager: ATen's amax/amin, division and FP8 conversion are already single
// vectorised passes, and a fused kernel built on the scalar FP8 conversion measured slower.)
constexpr int64_t kTile = 128;

void check_fp8_layout(const at::Tensor& x, int64_t block_rows, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(x.dim() == 2, name, ": a 2-D tensor expected");
  TORCH_CHECK(block_rows == 1 || block_rows == kTile, name, ": block_rows must be 1 or 128");
}

// out (R, Cp) FP32: each FP8 code (uint8 bits, E4M3 or E5M2) as a float times its tile's scale
at::Tensor fp8_dequantize(const at::Tensor& data, const at::Tensor& scale, int64_t block_rows, bool e5m2) {
  check_fp8_layout(data, block_rows, "fp8_dequantize data");
  check_dtype(data, at::kByte, "fp8_dequantize data");
  check_cpu(scale, "fp8_dequantize scale");
  check_dtype(scale, at::kFloat, "fp8_dequantize scale");
  const int64_t R = data.size(0), Cp = data.size(1), Cb = Cp / kTile;
  TORCH_CHECK(Cp % kTile == 0, "fp8_dequantize: columns must be a multiple of 128");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == (R + block_rows - 1) / block_rows && scale.size(1) == Cb,
              "fp8_dequantize: scale has the wrong shape");
  float lut[256];
  for (int i = 0; i < 256; ++i) {
    lut[i] = e5m2 ? static_cast<float>(c10::Float8_e5m2(static_cast<uint8_t>(i), c10::Float8_e5m2::from_bits()))
                  : static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  }
  auto out = at::empty({R, Cp}, data.options().dtype(at::kFloat));
  const uint8_t* dp = data.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, grain(Cp), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* s = sp + (r / block_rows) * Cb;
      const uint8_t* d = dp + r * Cp;
      float* o = op + r * Cp;
      if (!e5m2) {  // E4M3 widened in registers as the held-weight GEMM does, by the table where 256 s overflows
        for (int64_t t = 0; t < Cb; ++t) decode_fp8_scaled(d + t * kTile, kTile, s[t], lut, o + t * kTile);
        continue;
      }
      for (int64_t c = 0; c < Cp; ++c) o[c] = lut[d[c]] * s[c / kTile];
    }
  });
  return out;
}

// ---- fused attention, one call per (batch row, head) ----------------------------------------------
// ATen's scaled_dot_product_attention of q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv) with a
// boolean mask (B or 1, 1, T, S), or causal (T == S) without one, split over flyer's workers by
// (row, head): a prefill chunk's attention otherwise runs on torch's one thread. One call's bits
// where ATen takes its fused kernel; on its math path (batched GEMMs over (B, H)) within FP32 rounding of them.
at::Tensor attention_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& mask, double scale) {
  for (const auto* t : {&q, &k, &v}) {  // any strides: ATen's kernel reads them
    TORCH_CHECK(t->device().is_cpu(), "attention q, k, v: expected CPU tensors");
    check_dtype(*t, at::kFloat, "attention q, k, v");
  }
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes().slice(0, 2) == q.sizes().slice(0, 2) &&
                  v.sizes().slice(0, 3) == k.sizes().slice(0, 3) && k.size(3) == q.size(3),
              "attention: q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv) expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), S = k.size(2);
  const bool masked = mask.has_value() && mask->defined();
  if (masked) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool && mask->dim() == 4 &&
                    (mask->size(0) == 1 || mask->size(0) == B) && mask->size(1) == 1 && mask->size(2) == T &&
                    mask->size(3) == S,
                "attention mask: bool (B or 1, 1, T, S) expected");
  } else {
    TORCH_CHECK(T == S, "attention: without a mask (causal) T must equal S");
  }
  auto out = at::empty({B, H, T, v.size(3)}, q.options());
  // the caller's autograd state on every worker (an inference tensor is written only in inference mode)
  const bool inference = c10::InferenceMode::is_enabled(), grad = at::GradMode::is_enabled();
  std::mutex failed;
  std::exception_ptr error;
  const double flops = 2. * B * H * T * S * (q.size(3) + v.size(3));
  const double seconds = one_thread_seconds((q.numel() + k.numel() + v.numel()) * 4., flops);
  parallel_items(B * H, seconds, [&](int64_t i0, int64_t i1) {
    c10::InferenceMode inference_mode(inference);
    at::AutoGradMode grad_mode(grad);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      try {
        const auto head = [&](const at::Tensor& t) { return t.narrow(0, b, 1).narrow(1, h, 1); };
        c10::optional<at::Tensor> m;
        if (masked) m = mask->narrow(0, mask->size(0) == 1 ? 0 : b, 1);
        head(out).copy_(at::scaled_dot_product_attention(head(q), head(k), head(v), m, 0.0, !masked, scale));
      } catch (...) {
        std::lock_guard<std::mutex> lock(failed);
        if (!error) error = std::current_exception();
      }
    }
  });
  if (error) std::rethrow_exception(error);
  return out;
}

}  // namespace

// The kernels touch no Python object: each releases the GIL, so that a server's event loop runs
// while the scheduler thread computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("xent_chunk", &xent_chunk, "log p(target) and softmax - onehot of a chunk of logits",
        py::call_guard<py::gil_scoped_release>());
  m.def("swiglu", &swiglu, "silu(h1) * h3 of h13 = [h1 | h3]",
        py::call_guard<py::gil_scoped_release>());
  m.def("swiglu_backward", &swiglu_backward, "gradient of swiglu with respect to h13",
        py::call_guard<py::gil_scoped_release>());
  m.def("combine", &combine, "FP32 weighted sum of each token's rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("combine_backward", &combine_backward, "gradients of combine: rows and weights",
        py::call_guard<py::gil_scoped_release>());
  m.def("segment_sum", &segment_sum, "sum of each token's rows, rounded as index_add_",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "RMSNorm of each row times weight, and the rows' 1/rms",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_backward", &rms_norm_backward, "gradients of rms_norm: input and weight",
        py::call_guard<py::gil_scoped_release>());
  m.def("grouped_mm", &grouped_mm, "each group's rows times its weight, transposed",
        py::arg("x"), py::arg("counts"), py::arg("w"), py::arg("max_rows"), py::arg("scale") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "F.linear of FP32 rows on an FP32, BF16 or FP8 weight, computed in FP32",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("scale") = py::none(), py::arg("max_rows"),
        py::call_guard<py::gil_scoped_release>());
  m.def("set_threads", &set_threads, "flyer's worker threads (the caller's included) and the least work split",
        py::call_guard<py::gil_scoped_release>());
  m.def("threads", &threads, "flyer's worker threads, the caller's included");
  m.def("worker_items", &worker_items, "items the worker threads (not the callers) have run");
  m.def("fp8_dequantize", &fp8_dequantize, "FP8 codes times their tile scales, as FP32",
        py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, "each row's index of its largest value, as torch.argmax(x, -1)",
        py::call_guard<py::gil_scoped_release>());
  m.def("mla_decode", &mla_decode, "absorbed MLA attention of a few new tokens over a paged latent cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("index_scores", &index_scores, "DSA indexer scores of a few new tokens over a paged index-key cache",
        py::arg("q"), py::arg("w"), py::arg("pool"), py::arg("tables"), py::arg("first"), py::arg("n_slots"),
        py::arg("scale"), py::arg("key_scale") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("index_scores_fp4", &index_scores_fp4, "indexer scores of a few new tokens over DeepSeek-V4's FP4 index keys",
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_heads", &attention_heads, "scaled_dot_product_attention, one call per (batch row, head)",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_blas", &set_blas,
        "the kernels' GEMMs (grouped_mm's large groups, mla_decode): torch's BLAS (true, where found) or a plain loop");
  m.def("has_blas", &has_blas, "whether torch's BLAS (sgemm_) was found");
}
