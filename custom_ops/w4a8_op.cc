// Attribute and input checks of ai.fptq::W4A8MatMul and W8A8MatMul (see w4a8_op.h), shared by all kernels.
#include "w4a8_op.h"

#include <sstream>
#include <vector>

namespace fptq {
namespace {

// "[2, 3, 4]": shapes in messages read like numpy's.
std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// Reads the int attribute `name` of the node. info: kernel info; op_type, node: for messages.
int64_t int_attribute(const Ort::ConstKernelInfo& info, const char* name, const char* op_type,
                      const std::string& node) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    // ORT's own message does not say which op wants it.
    fail_invalid(op_type, node, std::string("missing int attribute '") + name + "'");
  }
}

// The checked shape of input `index`. context: kernel context; name: input name for messages.
std::vector<int64_t> input_shape(Ort::KernelContext& context, int index, const char* name, const char* op_type,
                                 const std::string& node) {
  Ort::ConstValue value = context.GetInput(index);
  if (value == nullptr || !value.IsTensor()) {
    fail_invalid(op_type, node, std::string("input ") + name + " is not a tensor");
  }
  return value.GetTensorTypeAndShapeInfo().GetShape();
}

// Fails unless `shape` equals `expected`. name: input name; why: how `expected` follows from
// the attributes, for the message.
void expect_shape(const std::vector<int64_t>& shape, const std::vector<int64_t>& expected, const char* name,
                  const char* why, const char* op_type, const std::string& node) {
  if (shape != expected) {
    fail_invalid(op_type, node, std::string(name) + " has shape " + shape_str(shape) + ", expected " + shape_str(expected) +
                           " (" + why + ")");
  }
}

// Checks the weight inputs b, b + 1 (scales) and b + 2 (zero_points) against attrs; names: of
// the three, for messages.
void expect_weights(Ort::KernelContext& context, const W4A8Attrs& attrs, int b, const char* const (&names)[3],
                    const std::string& node) {
  const char* op_type = attrs.op_type();
  const std::vector<int64_t> grouped = {attrs.N, attrs.groups()};
  const bool bytes = attrs.weight_bits == 8;  // one weight per byte of B, else two
  expect_shape(input_shape(context, b, names[0], op_type, node), {attrs.N, bytes ? attrs.K : (attrs.K + 1) / 2},
               names[0], bytes ? "[N, K]" : "[N, ceil(K/2)]", op_type, node);
  for (int i = 1; i < 3; ++i) {
    expect_shape(input_shape(context, b + i, names[i], op_type, node), grouped, names[i], "[N, ceil(K/group_size)]",
                 op_type, node);
  }
}

}  // namespace

void fail_invalid(const char* op_type, const std::string& node, const std::string& message) {
  throw Ort::Exception(std::string(op_type) + " node '" + node + "': " + message, ORT_INVALID_ARGUMENT);
}

bool inputs_constant(const Ort::ConstKernelInfo& info, std::initializer_list<int> inputs) {
  for (int input : inputs) {
    int is_constant = 0;
    try {
      info.GetTensorConstantInput(static_cast<size_t>(input), &is_constant);
    } catch (const Ort::Exception&) {
      return false;
    }
    if (!is_constant) return false;
  }
  return true;
}

W4A8Attrs read_attributes(const Ort::ConstKernelInfo& info, int64_t weight_bits, bool rescored) {
  const std::string node = info.GetNodeName();
  const char* op_type = rescored ? kRescoredOpType : op_type_for_bits(weight_bits);
  W4A8Attrs attrs;
  attrs.weight_bits = weight_bits;
  attrs.K = int_attribute(info, "K", op_type, node);
  attrs.N = int_attribute(info, "N", op_type, node);
  attrs.group_size = int_attribute(info, "group_size", op_type, node);
  attrs.act_mode = int_attribute(info, "act_mode", op_type, node);
  if (rescored) attrs.top_k = int_attribute(info, "top_k", op_type, node);

  // Bounds keep every size product (N * K, M * K) far from int64 overflow.
  constexpr int64_t kMaxDim = int64_t{1} << 31;
  std::ostringstream why;
  if (attrs.group_size <= 0 || attrs.group_size % 2 || attrs.group_size > kMaxGroupSize) {
    why << "group_size=" << attrs.group_size << " must be even and in [2, " << kMaxGroupSize << "]";
  } else if (attrs.K <= 0 || attrs.K >= kMaxDim) {
    why << "K=" << attrs.K << " must be positive";
  } else if (attrs.N <= 0 || attrs.N >= kMaxDim) {
    why << "N=" << attrs.N << " must be positive";
  } else if (attrs.act_mode != kActPerTensorStatic && attrs.act_mode != kActPerTokenDynamic) {
    why << "act_mode=" << attrs.act_mode << " must be " << kActPerTensorStatic << " (per-tensor static) or "
        << kActPerTokenDynamic << " (per-token dynamic)";
  } else if (rescored && (attrs.top_k < 1 || attrs.top_k > attrs.N)) {
    why << "top_k=" << attrs.top_k << " must be in [1, N=" << attrs.N << "]";
  }
  if (!why.str().empty()) fail_invalid(op_type, node, why.str());
  return attrs;
}

W4A8Tensors bind_tensors(Ort::KernelContext& context, const W4A8Attrs& attrs, const std::string& node) {
  const char* op_type = attrs.op_type();
  const std::vector<int64_t> x_shape = input_shape(context, kInX, "X", op_type, node);
  const ONNXTensorElementDataType x_type = context.GetInput(kInX).GetTensorTypeAndShapeInfo().GetElementType();
  if (x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    fail_invalid(op_type, node, "X must be float32 or float16, its element type is " + std::to_string(x_type));
  }
  if (x_shape.empty() || x_shape.back() != attrs.K) {
    fail_invalid(op_type, node,
                 "X has shape " + shape_str(x_shape) + ", its last dim must be K=" + std::to_string(attrs.K));
  }
  expect_weights(context, attrs, kInB, {"B", "scales", "zero_points"}, node);
  int64_t act_scale_count = 1;
  for (int64_t d : input_shape(context, kInActScale, "act_scale", op_type, node)) act_scale_count *= d;
  if (act_scale_count != 1) {
    fail_invalid(op_type, node, "act_scale must hold exactly one element, it holds " + std::to_string(act_scale_count));
  }

  W4A8Tensors t;
  t.problem.attrs = attrs;
  t.problem.M = 1;
  for (size_t i = 0; i + 1 < x_shape.size(); ++i) t.problem.M *= x_shape[i];
  t.x_type = x_type;
  t.x = context.GetInput(kInX).GetTensorRawData();
  t.b = context.GetInput(kInB).GetTensorData<uint8_t>();
  t.scales = context.GetInput(kInScales).GetTensorData<float>();
  t.zero_points = context.GetInput(kInZeroPoints).GetTensorData<uint8_t>();
  t.act_scale = context.GetInput(kInActScale).GetTensorData<float>();
  std::vector<int64_t> y_shape = x_shape;
  y_shape.back() = attrs.N;
  t.y = context.GetOutput(0, y_shape).GetTensorMutableRawData();
  return t;
}

ResidualTensors bind_residual(Ort::KernelContext& context, const W4A8Attrs& attrs, const std::string& node) {
  expect_weights(context, attrs, kInResidualB, {"residual_B", "residual_scales", "residual_zero_points"}, node);
  return {context.GetInput(kInResidualB).GetTensorData<uint8_t>(),
          context.GetInput(kInResidualScales).GetTensorData<float>(),
          context.GetInput(kInResidualZeroPoints).GetTensorData<uint8_t>()};
}

}  // namespace fptq
