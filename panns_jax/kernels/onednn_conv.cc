// oneDNN's direct convolutions as XLA FFI handlers (panns_jax/kernels/onednn.py builds and
// registers them): float32, NHWC x HWIO with a stride, padding and dilation along H (the time
// axis) and `pad_w` zeros on both sides of W, or NWC x WIO (1-D) with the same along W.
// Forward, backward data and backward weights; oneDNN picks its weight layout ("any") and the
// weights are reordered into it on each call.
#include <cstdint>
#include <exception>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Desc = dnnl::memory::desc;
using Tag = dnnl::memory::format_tag;
constexpr auto kF32 = dnnl::memory::data_type::f32;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// NHWC x HWIO (2-D) or NWC x WIO (1-D: `kh` is the kernel, w = kw = 1 and no W axis).
struct Geometry {
  bool one_d;
  int64_t n, h, w, c, kh, kw, o;
  int64_t stride, pad_top, pad_bottom, pad_w, dilation;
  int64_t OutH() const { return (h + pad_top + pad_bottom - ((kh - 1) * dilation + 1)) / stride + 1; }
  Desc Src() const { return one_d ? Desc({n, c, h}, kF32, Tag::nwc) : Desc({n, c, h, w}, kF32, Tag::nhwc); }
  Desc Dst() const {
    return one_d ? Desc({n, o, OutH()}, kF32, Tag::nwc)
                 : Desc({n, o, OutH(), w + 2 * pad_w - kw + 1}, kF32, Tag::nhwc);
  }
  Desc Weights() const { return one_d ? Desc({o, c, kh}, kF32, Tag::wio) : Desc({o, c, kh, kw}, kF32, Tag::hwio); }
  Desc AnyWeights() const { return one_d ? Desc({o, c, kh}, kF32, Tag::any) : Desc({o, c, kh, kw}, kF32, Tag::any); }
  dnnl::memory::dims Strides() const { return one_d ? dnnl::memory::dims{stride} : dnnl::memory::dims{stride, 1}; }
  dnnl::memory::dims Dilates() const {  // oneDNN counts dilation from 0.
    return one_d ? dnnl::memory::dims{dilation - 1} : dnnl::memory::dims{dilation - 1, 0};
  }
  dnnl::memory::dims PadLeft() const { return one_d ? dnnl::memory::dims{pad_top} : dnnl::memory::dims{pad_top, pad_w}; }
  dnnl::memory::dims PadRight() const {
    return one_d ? dnnl::memory::dims{pad_bottom} : dnnl::memory::dims{pad_bottom, pad_w};
  }
  dnnl::convolution_forward::primitive_desc Forward(dnnl::prop_kind kind) const {
    return dnnl::convolution_forward::primitive_desc(Engine(), kind, dnnl::algorithm::convolution_direct,
                                                     Src(), AnyWeights(), Dst(), Strides(), Dilates(),
                                                     PadLeft(), PadRight());
  }
};

struct Attrs {
  int64_t stride, pad_top, pad_bottom, pad_w, dilation;
};

Geometry Of(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, const Attrs& a) {
  if (x.size() == 3) return {true, x[0], x[1], 1, x[2], w[0], 1, w[2], a.stride, a.pad_top, a.pad_bottom, 0, a.dilation};
  return {false, x[0], x[1], x[2], x[3], w[0], w[1], w[3], a.stride, a.pad_top, a.pad_bottom, a.pad_w, a.dilation};
}

// A user buffer in oneDNN's layout `want`: the buffer itself, or a reordered copy.
dnnl::memory InLayout(const Desc& have, const Desc& want, void* data, dnnl::stream& stream) {
  dnnl::memory user(have, Engine(), data);
  if (want == have) return user;
  dnnl::memory copy(want, Engine());
  dnnl::reorder(user, copy).execute(stream, user, copy);
  return copy;
}

// Runs `body`, turning a oneDNN error (an unsupported shape, memory) into an XLA error that
// JAX raises in Python, instead of an exception crossing the C boundary.
template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride, int64_t pad_top, int64_t pad_bottom, int64_t pad_w,
                   int64_t dilation) {
  Attrs a{stride, pad_top, pad_bottom, pad_w, dilation};
  return Guarded([&] {
    Geometry g = Of(x.dimensions(), w.dimensions(), a);
    dnnl::stream stream(Engine());
    auto pd = g.Forward(dnnl::prop_kind::forward_inference);
    dnnl::memory src(g.Src(), Engine(), x.typed_data());
    dnnl::memory dst(g.Dst(), Engine(), y->typed_data());
    dnnl::memory weights = InLayout(g.Weights(), pd.weights_desc(), w.typed_data(), stream);
    dnnl::convolution_forward(pd).execute(
        stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
    stream.wait();
  });
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pad_top,
                        int64_t pad_bottom, int64_t pad_w, int64_t dilation) {
  Attrs a{stride, pad_top, pad_bottom, pad_w, dilation};
  return Guarded([&] {
    Geometry g = Of(dx->dimensions(), w.dimensions(), a);
    dnnl::stream stream(Engine());
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(), g.Strides(),
        g.Dilates(), g.PadLeft(), g.PadRight(), g.Forward(dnnl::prop_kind::forward_training));
    dnnl::memory diff_dst(g.Dst(), Engine(), dy.typed_data());
    dnnl::memory diff_src(g.Src(), Engine(), dx->typed_data());
    dnnl::memory weights = InLayout(g.Weights(), pd.weights_desc(), w.typed_data(), stream);
    dnnl::convolution_backward_data(pd).execute(
        stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, diff_src}});
    stream.wait();
  });
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad_top,
                           int64_t pad_bottom, int64_t pad_w, int64_t dilation) {
  Attrs a{stride, pad_top, pad_bottom, pad_w, dilation};
  return Guarded([&] {
    Geometry g = Of(x.dimensions(), dw->dimensions(), a);
    dnnl::stream stream(Engine());
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(), g.Strides(),
        g.Dilates(), g.PadLeft(), g.PadRight(), g.Forward(dnnl::prop_kind::forward_training));
    dnnl::memory src(g.Src(), Engine(), x.typed_data());
    dnnl::memory diff_dst(g.Dst(), Engine(), dy.typed_data());
    dnnl::memory user(g.Weights(), Engine(), dw->typed_data());
    bool reorder = pd.diff_weights_desc() != g.Weights();
    dnnl::memory diff_weights = reorder ? dnnl::memory(pd.diff_weights_desc(), Engine()) : user;
    dnnl::convolution_backward_weights(pd).execute(
        stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
    if (reorder) dnnl::reorder(diff_weights, user).execute(stream, diff_weights, user);
    stream.wait();
  });
}

}  // namespace

#define PANNS_BIND_TWO_IN_ONE_OUT                                                       \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>() \
      .Attr<int64_t>("stride").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom")       \
      .Attr<int64_t>("pad_w").Attr<int64_t>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConv, Forward, PANNS_BIND_TWO_IN_ONE_OUT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData, PANNS_BIND_TWO_IN_ONE_OUT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights, PANNS_BIND_TWO_IN_ONE_OUT);
