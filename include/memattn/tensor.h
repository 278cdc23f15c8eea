// Framework-free tensor views: what crosses from Python (DLPack) into the core.
// A view never owns memory; the caller (the Python layer) allocates and keeps it alive.
#pragma once

#include <cstdint>
#include <string>

namespace memattn {

enum class DType : std::uint8_t { f16, bf16, f32, f64, boolean };
enum class DeviceType : std::uint8_t { cpu, cuda };

const char* dtype_name(DType dtype);
// "f16", "bf16", "f32", "f64", "bool": the dtype part of kernel names ("cpu/avx2/f32").
const char* dtype_short_name(DType dtype);
const char* device_name(DeviceType device);
int dtype_bytes(DType dtype);

inline constexpr int kMaxRank = 4;

// A strided view with rank <= 4. Strides are in elements (DLPack/torch convention) and may
// be 0 (broadcast) or negative. `data == nullptr` with `rank == 0` means "not given".
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  DeviceType device = DeviceType::cpu;
  int device_index = 0;
  int rank = -1;  // -1: argument absent
  std::int64_t sizes[kMaxRank] = {0, 0, 0, 0};
  std::int64_t strides[kMaxRank] = {0, 0, 0, 0};

  bool present() const { return rank >= 0; }
  std::int64_t size(int dim) const { return sizes[dim]; }
  std::int64_t stride(int dim) const { return strides[dim]; }
  std::int64_t numel() const;
  // "[2, 8, 128, 64]": used in every error message that shows a shape.
  std::string shape_string() const;
  std::string stride_string() const;
};

}  // namespace memattn
