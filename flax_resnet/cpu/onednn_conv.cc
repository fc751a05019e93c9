// oneDNN convolutions for XLA:CPU, called as jax.ffi custom calls.
//
// Three handlers share one primitive cache: the forward conv, its input
// gradient and its weight gradient, for NHWC activations and HWIO kernels
// (JAX's layout, row-major, as XLA hands custom calls their buffers) with
// strides, explicit padding and feature groups. Activations stay in NHWC (the
// layout PyTorch's channels_last uses, same oneDNN kernels); the kernel is
// reordered on every call into the blocked layout the primitive prefers.
//
// Thread safety: primitives are immutable once built and executed with a
// user-provided scratchpad owned by the calling thread, so XLA may run several
// of these calls at once. The cache is guarded by a mutex.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

struct Geometry {
  int dtype;  // 0: f32, 1: bf16
  int64_t n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr, g;

  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
  std::string key() const {
    std::string k;
    for (int64_t v : {int64_t(dtype), n, h, w, c, o, kh, kw, sh, sw, pt, pb,
                      pl, pr, g}) {
      k += std::to_string(v);
      k += ',';
    }
    return k;
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::data_type DataType(int dtype) {
  return dtype == 1 ? memory::data_type::bf16 : memory::data_type::f32;
}

// JAX's HWIO kernel as a oneDNN weights descriptor: (O, I, KH, KW) or, with
// groups, (G, O/G, I/G, KH, KW), with the strides of the row-major HWIO
// buffer (output channel o = g * O/G + o').
memory::desc KernelDesc(const Geometry& s) {
  const int64_t in_g = s.c / s.g, out_g = s.o / s.g;
  const int64_t kw_stride = in_g * s.o, kh_stride = s.kw * kw_stride;
  if (s.g == 1) {
    return memory::desc({s.o, in_g, s.kh, s.kw}, DataType(s.dtype),
                        memory::dims{1, s.o, kh_stride, kw_stride});
  }
  return memory::desc({s.g, out_g, in_g, s.kh, s.kw}, DataType(s.dtype),
                      memory::dims{out_g, 1, s.o, kh_stride, kw_stride});
}

memory::dims KernelAnyDims(const Geometry& s) {
  if (s.g == 1) return {s.o, s.c, s.kh, s.kw};
  return {s.g, s.o / s.g, s.c / s.g, s.kh, s.kw};
}

// The three primitives of one conv geometry, and the kernel reorders
// between JAX's HWIO buffer and the layouts they chose.
struct Conv {
  memory::desc src, dst, kernel_user;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::primitive fwd, bwd_data, bwd_weights;
  // Empty when the primitive takes the kernel as HWIO already.
  dnnl::primitive kernel_to_fwd, kernel_to_bwd_data, bwd_weights_to_kernel;
};

std::unique_ptr<Conv> Build(const Geometry& s) {
  auto conv = std::make_unique<Conv>();
  const auto dt = DataType(s.dtype);
  conv->src = memory::desc({s.n, s.c, s.h, s.w}, dt, tag::nhwc);
  conv->dst = memory::desc({s.n, s.o, s.oh(), s.ow()}, dt, tag::nhwc);
  conv->kernel_user = KernelDesc(s);
  const memory::desc kernel_any(KernelAnyDims(s), dt, tag::any);
  const memory::dims strides{s.sh, s.sw}, pad_l{s.pt, s.pl},
      pad_r{s.pb, s.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& eng = Engine();
  conv->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, conv->src, kernel_any, conv->dst,
      strides, pad_l, pad_r, attr);
  conv->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, conv->src, kernel_any,
      conv->dst, strides, pad_l, pad_r, conv->fwd_pd, attr);
  conv->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, conv->src, kernel_any,
      conv->dst, strides, pad_l, pad_r, conv->fwd_pd, attr);
  conv->fwd = dnnl::convolution_forward(conv->fwd_pd);
  conv->bwd_data = dnnl::convolution_backward_data(conv->bwd_data_pd);
  conv->bwd_weights = dnnl::convolution_backward_weights(conv->bwd_weights_pd);
  auto reorder = [&](const memory::desc& from, const memory::desc& to) {
    if (from == to) return dnnl::primitive();
    return dnnl::primitive(dnnl::reorder(
        dnnl::reorder::primitive_desc(eng, from, eng, to)));
  };
  conv->kernel_to_fwd =
      reorder(conv->kernel_user, conv->fwd_pd.weights_desc());
  conv->kernel_to_bwd_data =
      reorder(conv->kernel_user, conv->bwd_data_pd.weights_desc());
  conv->bwd_weights_to_kernel =
      reorder(conv->bwd_weights_pd.diff_weights_desc(), conv->kernel_user);
  return conv;
}

std::mutex cache_mutex;
std::mutex execute_mutex;
std::unordered_map<std::string, std::unique_ptr<Conv>>& Cache() {
  static auto* cache =
      new std::unordered_map<std::string, std::unique_ptr<Conv>>();
  return *cache;
}

// Builds on first use; throws dnnl::error if oneDNN cannot do this geometry.
const Conv& Lookup(const Geometry& s) {
  const std::string key = s.key();
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& cache = Cache();
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, Build(s)).first;
  return *it->second;
}

// Per-thread, grow-only, 64-byte aligned scratch memory.
class Scratch {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      data_.reset(static_cast<char*>(std::aligned_alloc(64, Round(bytes))));
      size_ = data_ ? Round(bytes) : 0;
    }
    return data_.get();
  }

 private:
  static size_t Round(size_t bytes) { return (bytes + 63) / 64 * 64; }
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

enum Slot { kPrimitiveScratch, kKernel, kNumSlots };

void* ThreadScratch(Slot slot, size_t bytes) {
  thread_local Scratch scratch[kNumSlots];
  return scratch[slot].Get(bytes);
}

memory Wrap(const memory::desc& desc, void* data) {
  return memory(desc, Engine(), data);
}

memory ScratchMemory(const memory::desc& desc, Slot slot) {
  return Wrap(desc, ThreadScratch(slot, desc.get_size()));
}

enum class Kind { kForward, kInputGrad, kKernelGrad };

int DtypeCode(ffi::DataType type) {
  if (type == ffi::DataType::F32) return 0;
  if (type == ffi::DataType::BF16) return 1;
  return -1;
}

// fwd:         a = x (N,H,W,C),    b = kernel (KH,KW,C/G,O), out = y
// input grad:  a = dy (N,OH,OW,O), b = kernel,              out = dx
// kernel grad: a = x,              b = dy,                  out = dkernel
template <Kind kind>
ffi::Error Run(ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::AnyBuffer> out, int64_t stride_h,
               int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
               int64_t pad_left, int64_t pad_right, int64_t groups) {
  const int dtype = DtypeCode(a.element_type());
  if (dtype < 0 || a.element_type() != b.element_type() ||
      a.element_type() != out->element_type()) {
    return ffi::Error::InvalidArgument("onednn conv: f32 or bf16 only");
  }
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 ||
      out->dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: rank-4 NHWC/HWIO only");
  }
  const auto x_dims = kind == Kind::kInputGrad ? out->dimensions()
                                               : a.dimensions();
  const auto k_dims = kind == Kind::kKernelGrad ? out->dimensions()
                                                : b.dimensions();
  Geometry s{dtype,      x_dims[0], x_dims[1],  x_dims[2],  x_dims[3],
             k_dims[3],  k_dims[0], k_dims[1],  stride_h,   stride_w,
             pad_top,    pad_bottom, pad_left,  pad_right,  groups};
  try {
    const Conv& conv = Lookup(s);
    // XLA's thunk executor runs independent ops at once (a conv's input and
    // kernel gradients, say). Each oneDNN call already spreads over every
    // OpenMP thread; two at once would put two thread teams on the same
    // cores, spinning at each other's barriers. So they take turns.
    std::lock_guard<std::mutex> one_at_a_time(execute_mutex);
    dnnl::stream stream(Engine());
    if (kind == Kind::kForward) {
      memory kernel = Wrap(conv.kernel_user, b.untyped_data());
      if (conv.kernel_to_fwd) {
        memory blocked =
            ScratchMemory(conv.fwd_pd.weights_desc(), kKernel);
        conv.kernel_to_fwd.execute(
            stream, {{DNNL_ARG_FROM, kernel}, {DNNL_ARG_TO, blocked}});
        kernel = blocked;
      }
      conv.fwd.execute(
          stream,
          {{DNNL_ARG_SRC, Wrap(conv.src, a.untyped_data())},
           {DNNL_ARG_WEIGHTS, kernel},
           {DNNL_ARG_DST, Wrap(conv.dst, out->untyped_data())},
           {DNNL_ARG_SCRATCHPAD,
            ScratchMemory(conv.fwd_pd.scratchpad_desc(), kPrimitiveScratch)}});
    } else if (kind == Kind::kInputGrad) {
      memory kernel = Wrap(conv.kernel_user, b.untyped_data());
      if (conv.kernel_to_bwd_data) {
        memory blocked =
            ScratchMemory(conv.bwd_data_pd.weights_desc(), kKernel);
        conv.kernel_to_bwd_data.execute(
            stream, {{DNNL_ARG_FROM, kernel}, {DNNL_ARG_TO, blocked}});
        kernel = blocked;
      }
      conv.bwd_data.execute(
          stream,
          {{DNNL_ARG_DIFF_DST, Wrap(conv.dst, a.untyped_data())},
           {DNNL_ARG_WEIGHTS, kernel},
           {DNNL_ARG_DIFF_SRC, Wrap(conv.src, out->untyped_data())},
           {DNNL_ARG_SCRATCHPAD,
            ScratchMemory(conv.bwd_data_pd.scratchpad_desc(),
                          kPrimitiveScratch)}});
    } else {
      memory kernel = Wrap(conv.kernel_user, out->untyped_data());
      memory diff_kernel =
          conv.bwd_weights_to_kernel
              ? ScratchMemory(conv.bwd_weights_pd.diff_weights_desc(),
                              kKernel)
              : kernel;
      conv.bwd_weights.execute(
          stream,
          {{DNNL_ARG_SRC, Wrap(conv.src, a.untyped_data())},
           {DNNL_ARG_DIFF_DST, Wrap(conv.dst, b.untyped_data())},
           {DNNL_ARG_DIFF_WEIGHTS, diff_kernel},
           {DNNL_ARG_SCRATCHPAD,
            ScratchMemory(conv.bwd_weights_pd.scratchpad_desc(),
                          kPrimitiveScratch)}});
      if (conv.bwd_weights_to_kernel) {
        conv.bwd_weights_to_kernel.execute(
            stream, {{DNNL_ARG_FROM, diff_kernel}, {DNNL_ARG_TO, kernel}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

#define FLAX_RESNET_CONV_BINDING                                         \
  ffi::Ffi::Bind()                                                      \
      .Arg<ffi::AnyBuffer>()                                            \
      .Arg<ffi::AnyBuffer>()                                            \
      .Ret<ffi::AnyBuffer>()                                            \
      .Attr<int64_t>("stride_h")                                        \
      .Attr<int64_t>("stride_w")                                        \
      .Attr<int64_t>("pad_top")                                         \
      .Attr<int64_t>("pad_bottom")                                      \
      .Attr<int64_t>("pad_left")                                        \
      .Attr<int64_t>("pad_right")                                       \
      .Attr<int64_t>("groups")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxResnetOnednnConvForward, Run<Kind::kForward>,
                              FLAX_RESNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxResnetOnednnConvInputGrad,
                              Run<Kind::kInputGrad>, FLAX_RESNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxResnetOnednnConvKernelGrad,
                              Run<Kind::kKernelGrad>,
                              FLAX_RESNET_CONV_BINDING);

// The identity as an opaque call, for flax_resnet.cpu.fusion_barrier: XLA
// cannot fuse through a custom call, so the operand's producer is computed
// once into memory. The result is declared to alias the operand, so there is
// nothing to copy.
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (out->untyped_data() != x.untyped_data()) {
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxResnetMaterialize, Materialize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// Called at trace time: builds (and caches) the three primitives of one
// geometry. Returns 1 if oneDNN supports it, 0 if not (the caller then keeps
// XLA's convolution).
extern "C" int FlaxResnetOnednnConvSupported(int dtype, int64_t n, int64_t h,
                                             int64_t w, int64_t c, int64_t o,
                                             int64_t kh, int64_t kw,
                                             int64_t sh, int64_t sw,
                                             int64_t pt, int64_t pb,
                                             int64_t pl, int64_t pr,
                                             int64_t g) {
  Geometry s{dtype, n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr, g};
  if (dtype < 0 || dtype > 1 || g < 1 || c % g || o % g || s.oh() < 1 ||
      s.ow() < 1 || (h + pt + pb - kh) < 0 || (w + pl + pr - kw) < 0) {
    return 0;
  }
  try {
    Lookup(s);
    return 1;
  } catch (const std::exception&) {
    return 0;
  }
}

extern "C" const char* FlaxResnetOnednnVersion() {
  static std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return version.c_str();
}
