// oneDNN's direct convolutions as XLA FFI handlers, for benchmarks/onednn_conv.py: NHWC x HWIO,
// stride 1, the same `pad` zeros on every side, float32. Forward, backward data and backward
// weights; oneDNN picks its weight layout ("any") and the weights are reordered on each call.
#include <cstdint>

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

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, pad;
  Desc Src() const { return Desc({n, c, h, w}, kF32, Tag::nhwc); }
  Desc Dst() const { return Desc({n, o, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1}, kF32, Tag::nhwc); }
  Desc Weights() const { return Desc({o, c, kh, kw}, kF32, Tag::hwio); }
  Desc AnyWeights() const { return Desc({o, c, kh, kw}, kF32, Tag::any); }
  dnnl::convolution_forward::primitive_desc Forward(dnnl::prop_kind kind) const {
    return dnnl::convolution_forward::primitive_desc(Engine(), kind, dnnl::algorithm::convolution_direct,
                                                     Src(), AnyWeights(), Dst(), {1, 1}, {pad, pad},
                                                     {pad, pad});
  }
};

Geometry Of(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, int64_t pad) {
  return {x[0], x[1], x[2], x[3], w[0], w[1], w[3], pad};
}

// A user buffer in oneDNN's layout `want`: the buffer itself, or a reordered copy.
dnnl::memory InLayout(const Desc& have, const Desc& want, void* data, dnnl::stream& stream) {
  dnnl::memory user(have, Engine(), data);
  if (want == have) return user;
  dnnl::memory copy(want, Engine());
  dnnl::reorder(user, copy).execute(stream, user, copy);
  return copy;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   int64_t pad) {
  Geometry g = Of(x.dimensions(), w.dimensions(), pad);
  dnnl::stream stream(Engine());
  auto pd = g.Forward(dnnl::prop_kind::forward_inference);
  dnnl::memory src(g.Src(), Engine(), x.typed_data());
  dnnl::memory dst(g.Dst(), Engine(), y->typed_data());
  dnnl::memory weights = InLayout(g.Weights(), pd.weights_desc(), w.typed_data(), stream);
  dnnl::convolution_forward(pd).execute(
      stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t pad) {
  Geometry g = Of(dx->dimensions(), w.dimensions(), pad);
  dnnl::stream stream(Engine());
  auto pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(), {1, 1},
      {pad, pad}, {pad, pad}, g.Forward(dnnl::prop_kind::forward_training));
  dnnl::memory diff_dst(g.Dst(), Engine(), dy.typed_data());
  dnnl::memory diff_src(g.Src(), Engine(), dx->typed_data());
  dnnl::memory weights = InLayout(g.Weights(), pd.weights_desc(), w.typed_data(), stream);
  dnnl::convolution_backward_data(pd).execute(
      stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, diff_src}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t pad) {
  Geometry g = Of(x.dimensions(), dw->dimensions(), pad);
  dnnl::stream stream(Engine());
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(), {1, 1},
      {pad, pad}, {pad, pad}, g.Forward(dnnl::prop_kind::forward_training));
  dnnl::memory src(g.Src(), Engine(), x.typed_data());
  dnnl::memory diff_dst(g.Dst(), Engine(), dy.typed_data());
  dnnl::memory user(g.Weights(), Engine(), dw->typed_data());
  bool reorder = pd.diff_weights_desc() != g.Weights();
  dnnl::memory diff_weights = reorder ? dnnl::memory(pd.diff_weights_desc(), Engine()) : user;
  dnnl::convolution_backward_weights(pd).execute(
      stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
  if (reorder) dnnl::reorder(diff_weights, user).execute(stream, diff_weights, user);
  stream.wait();
  return ffi::Error::Success();
}

}  // namespace

#define PANNS_BIND_TWO_IN_ONE_OUT                                                       \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>() \
      .Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConv, Forward, PANNS_BIND_TWO_IN_ONE_OUT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData, PANNS_BIND_TWO_IN_ONE_OUT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights, PANNS_BIND_TWO_IN_ONE_OUT);
