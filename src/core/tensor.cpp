#include "memattn/tensor.h"

#include <string>

namespace memattn {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::boolean:
      return "bool";
  }
  return "unknown";
}

const char* dtype_short_name(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::boolean:
      return "bool";
  }
  return "unknown";
}

const char* device_name(DeviceType device) {
  switch (device) {
    case DeviceType::cpu:
      return "cpu";
    case DeviceType::cuda:
      return "cuda";
  }
  return "unknown";
}

int dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f32:
      return 4;
    case DType::f64:
      return 8;
    case DType::boolean:
      return 1;
  }
  return 0;
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= sizes[i];
  return n;
}

namespace {
std::string join(const std::int64_t* values, int count) {
  std::string s = "[";
  for (int i = 0; i < count; ++i) {
    if (i) s += ", ";
    s += std::to_string(values[i]);
  }
  return s + "]";
}
}  // namespace

std::string TensorView::shape_string() const { return join(sizes, rank < 0 ? 0 : rank); }
std::string TensorView::stride_string() const { return join(strides, rank < 0 ? 0 : rank); }

}  // namespace memattn
