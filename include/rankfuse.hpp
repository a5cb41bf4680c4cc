/* rankfuse C++17 wrapper — header-only, hand-written over the generated C header.
 *
 * A thin layer: no logic beyond the C ABI. RAII handles (std::unique_ptr with deleters that call
 * the rf_*_free functions), errors as rankfuse::Error exceptions carrying the rf_status and the
 * library's message, and MatRef / MatMut views that describe caller memory as rf_matrix without
 * copying.
 *
 * Lifetimes follow the C contract: free a Runtime after every object made with it (declare it
 * first); a Lora is borrowed from its Adapter; a MatRef from Weights::get() points into the
 * weights' mapping and is valid until the Weights are destroyed. An EigenBasis needs no runtime
 * once made, and modules made on it keep what they need (it may be destroyed before them).
 * Thread safety is the C ABI's: Runtime::linear may run from many threads on shared objects;
 * Lora::set_rank needs exclusive access to that lora.
 */
#ifndef RANKFUSE_HPP
#define RANKFUSE_HPP

#include "rankfuse.h"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace rankfuse {

/* ---------------------------------------------------------------- errors */

/** What a failing rankfuse call throws: the stable status number and the library's message. */
class Error : public std::runtime_error {
 public:
  Error(rf_status status, const std::string &message)
      : std::runtime_error(message), status_(status) {}
  rf_status status() const noexcept { return status_; }

 private:
  rf_status status_;
};

/** Takes ownership of an rf_error: NULL returns, anything else is freed and thrown as Error. */
inline void check(rf_error *e) {
  if (e == nullptr) return;
  const rf_status status = rf_error_code(e);
  std::string message = rf_error_message(e);
  rf_error_free(e);
  throw Error(status, message);
}

/** Library version ("MAJOR.MINOR.PATCH") and ABI version. */
inline std::string version() { return rf_version(); }
inline uint32_t abi_version() noexcept { return rf_abi_version(); }

/** Throws RF_STATUS_UNSUPPORTED when the loaded library implements another ABI than this header. */
inline void check_abi() {
  if (rf_abi_version() != RF_ABI_VERSION)
    throw Error(RF_STATUS_UNSUPPORTED,
                "librankfuse implements ABI " + std::to_string(rf_abi_version()) +
                    ", rankfuse.h is ABI " + std::to_string(RF_ABI_VERSION));
}

/* ---------------------------------------------------------- element types */

/** 16-bit storage types: the bits of an IEEE half / a bfloat16 (no arithmetic here). */
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr rf_dtype value = RF_DTYPE_F32;
};
template <>
struct dtype_of<f16> {
  static constexpr rf_dtype value = RF_DTYPE_F16;
};
template <>
struct dtype_of<bf16> {
  static constexpr rf_dtype value = RF_DTYPE_BF16;
};

/** Bytes per element of a dtype (0 for a value that is not an rf_dtype, and for the
    block-quantized dtypes, whose elements share per-block scales: 34 bytes per 32 for Q8_0,
    18 per 32 for Q4_0, 144 per 256 for Q4_K, 210 per 256 for Q6_K). */
inline std::size_t dtype_size(rf_dtype d) noexcept {
  switch (d) {
    case RF_DTYPE_F32: return 4;
    case RF_DTYPE_F16: return 2;
    case RF_DTYPE_BF16: return 2;
    case RF_DTYPE_Q8_0:
    case RF_DTYPE_Q4_0:
    case RF_DTYPE_Q4_K:
    case RF_DTYPE_Q6_K: return 0;
  }
  return 0;
}

/* ------------------------------------------------------------------- span */

/** A minimal std::span stand-in (C++17): pointer + length, no ownership. */
template <class T>
class Span {
 public:
  constexpr Span() noexcept = default;
  constexpr Span(T *data, std::size_t size) noexcept : data_(data), size_(size) {}
  template <class C, class = decltype(std::declval<C &>().data()),
            class = std::enable_if_t<std::is_convertible<
                std::remove_pointer_t<decltype(std::declval<C &>().data())> (*)[], T (*)[]>::value>>
  constexpr Span(C &c) noexcept : data_(c.data()), size_(c.size()) {}
  constexpr T *data() const noexcept { return data_; }
  constexpr std::size_t size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  constexpr T *begin() const noexcept { return data_; }
  constexpr T *end() const noexcept { return data_ + size_; }
  constexpr T &operator[](std::size_t i) const noexcept { return data_[i]; }

 private:
  T *data_ = nullptr;
  std::size_t size_ = 0;
};

/* ---------------------------------------------------------- matrix views */

namespace detail {
/** Elements a rows x cols matrix with leading dimension ld spans; throws on a bad shape. */
inline std::size_t span_elems(int64_t rows, int64_t cols, int64_t ld) {
  if (rows < 0 || cols < 0 || ld < cols)
    throw Error(RF_STATUS_SHAPE, "matrix " + std::to_string(rows) + " x " + std::to_string(cols) +
                                     " with ld " + std::to_string(ld) + " is not a valid shape");
  if (rows == 0 || cols == 0) return 0;
  return static_cast<std::size_t>((rows - 1) * ld + cols);
}
inline void check_len(std::size_t have, int64_t rows, int64_t cols, int64_t ld) {
  const std::size_t need = span_elems(rows, cols, ld);
  if (have < need)
    throw Error(RF_STATUS_SHAPE, "buffer of " + std::to_string(have) + " elements is too small for " +
                                     std::to_string(rows) + " x " + std::to_string(cols) +
                                     " (ld " + std::to_string(ld) + "): " + std::to_string(need) +
                                     " needed");
}
}  // namespace detail

/** A read-only row-major matrix view over memory the caller keeps alive (an input of rf_linear). */
class MatRef {
 public:
  MatRef() noexcept : m_{nullptr, RF_DTYPE_F32, 0, 0, 0} {}
  /** From an rf_matrix (e.g. what rf_weights_get wrote). */
  explicit MatRef(const rf_matrix &m) noexcept : m_(m) {}
  /** Raw: data of `dtype`, rows x cols, ld elements between row starts (ld = -1: cols). */
  MatRef(const void *data, rf_dtype dtype, int64_t rows, int64_t cols, int64_t ld = -1)
      : m_{const_cast<void *>(data), dtype, rows, cols, ld < 0 ? cols : ld} {
    detail::span_elems(m_.rows, m_.cols, m_.ld);
  }
  /** Typed, length-checked: `size` elements at `data` must cover the view. */
  template <class T>
  MatRef(const T *data, std::size_t size, int64_t rows, int64_t cols, int64_t ld = -1)
      : MatRef(static_cast<const void *>(data), dtype_of<T>::value, rows, cols, ld) {
    detail::check_len(size, m_.rows, m_.cols, m_.ld);
  }
  /** From a contiguous container (std::vector<float>, std::array<bf16, N>, Span<const f16>...). */
  template <class C, class T = std::remove_cv_t<std::remove_pointer_t<decltype(std::declval<const C &>().data())>>>
  MatRef(const C &c, int64_t rows, int64_t cols, int64_t ld = -1)
      : MatRef(static_cast<const T *>(c.data()), c.size(), rows, cols, ld) {}

  const void *data() const noexcept { return m_.data; }
  rf_dtype dtype() const noexcept { return m_.dtype; }
  int64_t rows() const noexcept { return m_.rows; }
  int64_t cols() const noexcept { return m_.cols; }
  int64_t ld() const noexcept { return m_.ld; }
  /** Element (i, j) as float; only for RF_DTYPE_F32 views (throws otherwise). */
  float at_f32(int64_t i, int64_t j) const {
    if (m_.dtype != RF_DTYPE_F32) throw Error(RF_STATUS_DTYPE, "at_f32 on a view that is not F32");
    if (i < 0 || j < 0 || i >= m_.rows || j >= m_.cols)
      throw Error(RF_STATUS_SHAPE, "index (" + std::to_string(i) + ", " + std::to_string(j) +
                                       ") is outside " + std::to_string(m_.rows) + " x " +
                                       std::to_string(m_.cols));
    return static_cast<const float *>(m_.data)[i * m_.ld + j];
  }
  const rf_matrix *raw() const noexcept { return &m_; }

 private:
  rf_matrix m_;
};

/** A writable row-major matrix view (the output of rf_linear). */
class MatMut {
 public:
  MatMut(void *data, rf_dtype dtype, int64_t rows, int64_t cols, int64_t ld = -1)
      : m_{data, dtype, rows, cols, ld < 0 ? cols : ld} {
    detail::span_elems(m_.rows, m_.cols, m_.ld);
  }
  template <class T>
  MatMut(T *data, std::size_t size, int64_t rows, int64_t cols, int64_t ld = -1)
      : MatMut(static_cast<void *>(data), dtype_of<T>::value, rows, cols, ld) {
    detail::check_len(size, m_.rows, m_.cols, m_.ld);
  }
  template <class C, class T = std::remove_pointer_t<decltype(std::declval<C &>().data())>,
            class = std::enable_if_t<!std::is_const<T>::value>>
  MatMut(C &c, int64_t rows, int64_t cols, int64_t ld = -1)
      : MatMut(c.data(), c.size(), rows, cols, ld) {}

  void *data() const noexcept { return m_.data; }
  rf_dtype dtype() const noexcept { return m_.dtype; }
  int64_t rows() const noexcept { return m_.rows; }
  int64_t cols() const noexcept { return m_.cols; }
  int64_t ld() const noexcept { return m_.ld; }
  operator MatRef() const noexcept { return MatRef(m_); }
  rf_matrix *raw() noexcept { return &m_; }

 private:
  rf_matrix m_;
};

/* ------------------------------------------------------------------ handles */

namespace detail {
struct RuntimeDeleter {
  void operator()(rf_runtime *p) const noexcept { rf_runtime_free(p); }
};
struct WeightsDeleter {
  void operator()(rf_weights *p) const noexcept { rf_weights_free(p); }
};
struct AdapterDeleter {
  void operator()(rf_adapter *p) const noexcept { rf_adapter_free(p); }
};
struct PackedDeleter {
  void operator()(rf_packed *p) const noexcept { rf_packed_free(p); }
};
struct EigenBasisDeleter {
  void operator()(rf_eigen_basis *p) const noexcept { rf_eigen_basis_free(p); }
};
}  // namespace detail

using RuntimePtr = std::unique_ptr<rf_runtime, detail::RuntimeDeleter>;
using WeightsPtr = std::unique_ptr<rf_weights, detail::WeightsDeleter>;
using AdapterPtr = std::unique_ptr<rf_adapter, detail::AdapterDeleter>;
using PackedPtr = std::unique_ptr<rf_packed, detail::PackedDeleter>;
using EigenBasisPtr = std::unique_ptr<rf_eigen_basis, detail::EigenBasisDeleter>;

/** AdamW hyper-parameters (rf_adamw_options); the defaults are torch.optim.AdamW's. */
struct AdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
};

/** One module, borrowed from its Adapter (valid while the Adapter lives): LoRA, KRAdapter or
 *  EigenLoRAx (kind()). Every kind serves in Runtime::linear slots (mixed in one call on CPU
 *  runtimes) and trains with Runtime::backward, zero_grad and adamw_step; for EigenLoRAx the
 *  rank is the number of basis components in use. */
class Lora {
 public:
  explicit Lora(rf_lora *l) noexcept : l_(l) {}
  /** Shapes (the weight's in and out, for every kind), capacity, rank in use, alpha, scale. */
  rf_lora_info info() const {
    rf_lora_info out{};
    check(rf_lora_info_get(l_, &out));
    return out;
  }
  /** RF_MODULE_KIND_LORA, RF_MODULE_KIND_KRADAPTER or RF_MODULE_KIND_EIGENLORAX. */
  rf_module_kind kind() const {
    rf_module_kind out{};
    check(rf_lora_kind(l_, &out));
    return out;
  }
  /** Default rank of later calls (1..capacity; EigenLoRAx: 1..the basis' components). Needs
   *  exclusive access to this lora. */
  void set_rank(uint32_t rank) { check(rf_lora_set_rank(l_, rank)); }
  /** Replaces a LoRA's A (capacity x in) and B (out x capacity) with copies; resets the
   *  optimizer state. Needs exclusive access. */
  void set_weights(const MatRef &a, const MatRef &b) { check(rf_lora_set_weights(l_, a.raw(), b.raw())); }
  /** Zeroes the gradients (Runtime::backward accumulates). Needs exclusive access. */
  void zero_grad() { check(rf_lora_zero_grad(l_)); }
  /** One AdamW step; a NaN/Inf gradient throws RF_STATUS_NUMERIC. Needs exclusive access. */
  void adamw_step(const AdamWOptions &o = AdamWOptions()) {
    rf_adamw_options opts{};
    opts.struct_size = sizeof(rf_adamw_options);
    opts.lr = o.lr;
    opts.beta1 = o.beta1;
    opts.beta2 = o.beta2;
    opts.eps = o.eps;
    opts.weight_decay = o.weight_decay;
    check(rf_lora_adamw_step(l_, &opts));
  }
  rf_lora *raw() const noexcept { return l_; }

 private:
  rf_lora *l_;
};

/** A slot of a fused call: rank 0 = the lora's current rank; scale_mult multiplies its scale. */
inline rf_lora_slot slot(const Lora &l, uint32_t rank = 0, float scale_mult = 1.0f) noexcept {
  return rf_lora_slot{l.raw(), rank, scale_mult};
}
/** An empty slot (no adapter), e.g. for rows that run the base only. */
inline rf_lora_slot no_slot() noexcept { return rf_lora_slot{nullptr, 0, 1.0f}; }

/** Opened (memory-mapped) safetensors. Immutable; thread-safe. */
class Weights {
 public:
  explicit Weights(WeightsPtr p) noexcept : p_(std::move(p)) {}
  std::size_t count() const noexcept { return rf_weights_count(p_.get()); }
  std::string name(std::size_t i) const {
    const char *n = nullptr;
    check(rf_weights_name(p_.get(), i, &n));
    return n;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    for (std::size_t i = 0, n = count(); i < n; ++i) v.push_back(name(i));
    return v;
  }
  /** Zero-copy view into the mapping (read-only), valid while these Weights live. */
  MatRef get(const std::string &tensor) const {
    rf_matrix m{};
    check(rf_weights_get(p_.get(), tensor.c_str(), &m));
    return MatRef(m);
  }
  rf_weights *raw() const noexcept { return p_.get(); }

 private:
  WeightsPtr p_;
};

class EigenBasis;

/** An adapter: a named set of modules of one kind (LoRA, KRAdapter or EigenLoRAx), loaded or
 *  built with create() and the add_* methods. */
class Adapter {
 public:
  explicit Adapter(AdapterPtr p) noexcept : p_(std::move(p)) {}
  /** An empty adapter to add trainable modules to (needs no runtime). */
  static Adapter create(const std::string &name) {
    rf_adapter *a = nullptr;
    check(rf_adapter_new(name.c_str(), &a));
    return Adapter(AdapterPtr(a));
  }
  std::size_t module_count() const noexcept { return rf_adapter_module_count(p_.get()); }
  std::string module_name(std::size_t i) const {
    const char *n = nullptr;
    check(rf_adapter_module_name(p_.get(), i, &n));
    return n;
  }
  std::vector<std::string> module_names() const {
    std::vector<std::string> v;
    for (std::size_t i = 0, n = module_count(); i < n; ++i) v.push_back(module_name(i));
    return v;
  }
  /** The module at the base model's module path, e.g. "layers.0.self_attn.q_proj". */
  Lora module(const std::string &name) {
    rf_lora *l = nullptr;
    check(rf_adapter_module(p_.get(), name.c_str(), &l));
    return Lora(l);
  }
  /** Writes a PEFT folder (created if missing). An adapter of KRAdapter or EigenLoRAx modules
   *  is written in that method's folder format (EigenLoRAx: the loadings only; save the basis
   *  once with EigenBasis::save and reload with Runtime::load_eigenlorax). */
  void save_peft(const std::string &dir) const { check(rf_adapter_save_peft(p_.get(), dir.c_str())); }
  /** Appends a trainable LoRA module (PEFT init: A kaiming-uniform from seed, B = 0; rank =
   *  capacity). Needs exclusive access. */
  Lora add_lora(const std::string &module, int64_t in_features, int64_t out_features, uint32_t capacity,
                float alpha, rf_scaling scaling = RF_SCALING_LORA, rf_dtype dtype = RF_DTYPE_F32,
                uint64_t seed = 0) {
    rf_lora *l = nullptr;
    check(rf_adapter_add_lora(p_.get(), module.c_str(), in_features, out_features, capacity, alpha,
                              static_cast<uint32_t>(scaling), static_cast<uint32_t>(dtype), seed, &l));
    return Lora(l);
  }
  /** Appends a trainable KRAdapter module for a layer in -> out (update 0 until trained; fixed
   *  scale, the paper's default is 2). Needs exclusive access. */
  Lora add_kradapter(const std::string &module, int64_t in_features, int64_t out_features,
                     float scale = 2.0f, uint64_t seed = 0) {
    rf_lora *l = nullptr;
    check(rf_adapter_add_kradapter(p_.get(), module.c_str(), in_features, out_features, scale, seed, &l));
    return Lora(l);
  }
  /** Appends a trainable EigenLoRAx module on the basis' module `module` (in/out are the
   *  basis'): loadings K x rank, update 0 until trained, fixed scale. The module keeps the basis
   *  alive. Needs exclusive access. */
  inline Lora add_eigenlorax(const EigenBasis &basis, const std::string &module, uint32_t rank,
                             float scale = 1.0f, uint64_t seed = 0);
  /** Writes a GGUF LoRA adapter llama.cpp loads. architecture "" = the adapter's own (from the
   *  GGUF it came from); n_head / n_head_kv are needed for llama/mistral q/k modules. */
  void save_gguf(const std::string &path, const std::string &architecture = "",
                 rf_gguf_alpha alpha = RF_GGUF_ALPHA_AUTO, uint32_t n_head = 0,
                 uint32_t n_head_kv = 0) const {
    rf_gguf_save_options o{};
    check(rf_gguf_save_options_default(&o));
    o.alpha = alpha;
    o.architecture = architecture.empty() ? nullptr : architecture.c_str();
    o.n_head = n_head;
    o.n_head_kv = n_head_kv;
    check(rf_adapter_save_gguf(p_.get(), path.c_str(), &o));
  }
  /** general.architecture of the GGUF file the adapter came from; "" = none. */
  std::string architecture() const {
    const char *a = nullptr;
    check(rf_adapter_architecture(p_.get(), &a));
    return a ? a : "";
  }
  /** Throws unless every module has a base tensor "<module>.weight" of shape [out, in] and a
   *  GGUF base's architecture matches. */
  void check_base(const Weights &base) const { check(rf_adapter_check_base(p_.get(), base.raw())); }
  rf_adapter *raw() const noexcept { return p_.get(); }

 private:
  AdapterPtr p_;
};

/** An EigenLoRAx basis: per module, frozen principal directions shared by many adapters
 *  (Runtime::load_eigen_basis, EigenBasis::build). Immutable; thread-safe. */
class EigenBasis {
 public:
  explicit EigenBasis(EigenBasisPtr p) noexcept : p_(std::move(p)) {}
  /** Builds a basis from LoRA adapters (the modules present in all of them, same shapes): per
   *  module and side the top `components` principal directions, plus `augment` seeded random
   *  orthonormal directions. */
  static EigenBasis build(const std::vector<const Adapter *> &adapters, uint32_t components,
                          uint32_t augment = 0, uint64_t seed = 0) {
    std::vector<const rf_adapter *> raw;
    raw.reserve(adapters.size());
    for (const Adapter *a : adapters) raw.push_back(a ? a->raw() : nullptr);
    rf_eigen_basis *b = nullptr;
    check(rf_eigen_basis_build(raw.data(), raw.size(), components, augment, seed, &b));
    return EigenBasis(EigenBasisPtr(b));
  }
  /** Writes a basis folder (created if missing) that Runtime::load_eigen_basis reads back. */
  void save(const std::string &dir) const { check(rf_eigen_basis_save(p_.get(), dir.c_str())); }
  const rf_eigen_basis *raw() const noexcept { return p_.get(); }

 private:
  EigenBasisPtr p_;
};

inline Lora Adapter::add_eigenlorax(const EigenBasis &basis, const std::string &module, uint32_t rank,
                                    float scale, uint64_t seed) {
  rf_lora *l = nullptr;
  check(rf_adapter_add_eigenlorax(p_.get(), basis.raw(), module.c_str(), rank, scale, seed, &l));
  return Lora(l);
}

/** A frozen base matrix packed once for a runtime's CPU kernels (Runtime::pack): a copy that
 *  outlives the matrix it was made from and the runtime. Immutable; thread-safe. */
class Packed {
 public:
  explicit Packed(PackedPtr p) noexcept : p_(std::move(p)) {}
  /** Shape, dtype, bytes owned and the kernels the layout is for. */
  rf_packed_info info() const {
    rf_packed_info out{};
    check(rf_packed_info_get(p_.get(), &out));
    return out;
  }
  const rf_packed *raw() const noexcept { return p_.get(); }

 private:
  PackedPtr p_;
};

/** Options of Runtime; defaults = CPU, all cores. */
struct RuntimeOptions {
  rf_device device = RF_DEVICE_CPU;
  int32_t device_index = 0;
  uint32_t num_threads = 0;
  void *cuda_stream = nullptr;
  /** RF_ACT_QUANT_Q8: integer dots for decode on block-quantized W (x rounded per 32 values). */
  rf_act_quant act_quant = RF_ACT_QUANT_EXACT;
};

/** A runtime. Declare it before the objects made with it so it is destroyed after them. */
class Runtime {
 public:
  Runtime() {
    rf_runtime *rt = nullptr;
    check(rf_runtime_create(nullptr, &rt));
    p_.reset(rt);
  }
  explicit Runtime(const RuntimeOptions &o) {
    rf_runtime_options opts{};
    opts.struct_size = sizeof(rf_runtime_options);
    opts.device = o.device;
    opts.device_index = o.device_index;
    opts.num_threads = o.num_threads;
    opts.cuda_stream = o.cuda_stream;
    opts.act_quant = o.act_quant;
    rf_runtime *rt = nullptr;
    check(rf_runtime_create(&opts, &rt));
    p_.reset(rt);
  }

  /** Runtime facts as JSON (version, backend, CPU features, kernel variant, threads, GPU). */
  std::string info() const {
    std::size_t len = 0;
    check(rf_runtime_info(p_.get(), nullptr, 0, &len));
    std::string s(len + 1, '\0');
    check(rf_runtime_info(p_.get(), &s[0], s.size(), &len));
    s.resize(len);
    return s;
  }

  Weights open_weights(const std::string &path) {
    rf_weights *w = nullptr;
    check(rf_weights_open(p_.get(), path.c_str(), &w));
    return Weights(WeightsPtr(w));
  }

  /** Loads a PEFT LoRA folder or a KRAdapter folder (an EigenLoRAx one: load_eigenlorax). */
  Adapter load_peft(const std::string &dir) {
    rf_adapter *a = nullptr;
    check(rf_adapter_load_peft(p_.get(), dir.c_str(), &a));
    return Adapter(AdapterPtr(a));
  }

  /** Loads an EigenLoRAx adapter folder on the basis it was trained on (another basis throws
   *  RF_STATUS_INVALID_ARGUMENT naming the module). load_peft loads LoRA and KRAdapter folders. */
  Adapter load_eigenlorax(const EigenBasis &basis, const std::string &dir) {
    rf_adapter *a = nullptr;
    check(rf_adapter_load_eigenlorax(p_.get(), basis.raw(), dir.c_str(), &a));
    return Adapter(AdapterPtr(a));
  }

  /** Loads an EigenLoRAx basis: a folder from EigenBasis::save or a `rankfuse eigen build` file. */
  EigenBasis load_eigen_basis(const std::string &path) {
    rf_eigen_basis *b = nullptr;
    check(rf_eigen_basis_load(p_.get(), path.c_str(), &b));
    return EigenBasis(EigenBasisPtr(b));
  }

  /** Accumulates the lora's gradients for the layer output gradient dy (m x n) at rank (0 =
   *  current); dx (nullptr = not wanted) receives dy W + scale * (dy B_r) A_r. Needs exclusive
   *  access to the lora. */
  void backward(const Lora &l, const MatRef &x, const MatRef &w, const MatRef &dy, uint32_t rank = 0,
                rf_backward_mode mode = RF_BACKWARD_NESTED, MatMut *dx = nullptr) {
    check(rf_lora_backward(p_.get(), l.raw(), x.raw(), w.raw(), dy.raw(), rank,
                           static_cast<uint32_t>(mode), dx ? dx->raw() : nullptr));
  }

  /** Loads a GGUF LoRA adapter (llama.cpp's format); modules are named "blk.0.attn_q". */
  Adapter load_gguf(const std::string &path) {
    rf_adapter *a = nullptr;
    check(rf_adapter_load_gguf(p_.get(), path.c_str(), &a));
    return Adapter(AdapterPtr(a));
  }

  /** y = x W^T + bias + sum over slots of scale(slot) * (x A[:r]^T) B[:, :r]^T.
   *  row_slot empty: every slot applies to every row; else one entry per row of x
   *  (index into slots, -1 = base only). */
  void linear(const MatRef &x, const MatRef &w, const MatRef *bias, Span<const rf_lora_slot> slots,
              MatMut y, Span<const int32_t> row_slot = {}) {
    if (!row_slot.empty() && static_cast<int64_t>(row_slot.size()) != x.rows())
      throw Error(RF_STATUS_SHAPE, "row_slot has " + std::to_string(row_slot.size()) +
                                       " entries, x has " + std::to_string(x.rows()) + " rows");
    check(rf_linear(p_.get(), x.raw(), w.raw(), bias ? bias->raw() : nullptr, slots.data(),
                    slots.size(), row_slot.empty() ? nullptr : row_slot.data(), y.raw()));
  }

  /** The same with the slots written in place: rt.linear(x, w, &b, {rankfuse::slot(l)}, y). */
  void linear(const MatRef &x, const MatRef &w, const MatRef *bias,
              std::initializer_list<rf_lora_slot> slots, MatMut y, Span<const int32_t> row_slot = {}) {
    linear(x, w, bias, Span<const rf_lora_slot>(slots.begin(), slots.size()), y, row_slot);
  }

  /** Packs a frozen W once for this runtime's CPU kernels (RF_STATUS_UNSUPPORTED on CUDA). */
  Packed pack(const MatRef &w) {
    rf_packed *p = nullptr;
    check(rf_weights_pack(p_.get(), w.raw(), &p));
    return Packed(PackedPtr(p));
  }

  /** linear() with W packed by pack(): the same forms and results. A pack made for other
   *  kernels than this runtime's throws Error(RF_STATUS_INVALID_ARGUMENT). */
  void linear(const MatRef &x, const Packed &w, const MatRef *bias, Span<const rf_lora_slot> slots,
              MatMut y, Span<const int32_t> row_slot = {}) {
    if (!row_slot.empty() && static_cast<int64_t>(row_slot.size()) != x.rows())
      throw Error(RF_STATUS_SHAPE, "row_slot has " + std::to_string(row_slot.size()) +
                                       " entries, x has " + std::to_string(x.rows()) + " rows");
    check(rf_linear_packed(p_.get(), x.raw(), w.raw(), bias ? bias->raw() : nullptr, slots.data(),
                           slots.size(), row_slot.empty() ? nullptr : row_slot.data(), y.raw()));
  }

  void linear(const MatRef &x, const Packed &w, const MatRef *bias,
              std::initializer_list<rf_lora_slot> slots, MatMut y, Span<const int32_t> row_slot = {}) {
    linear(x, w, bias, Span<const rf_lora_slot>(slots.begin(), slots.size()), y, row_slot);
  }

  rf_runtime *raw() const noexcept { return p_.get(); }

 private:
  RuntimePtr p_;
};

}  // namespace rankfuse

#endif /* RANKFUSE_HPP */
