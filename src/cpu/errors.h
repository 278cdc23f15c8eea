// Errors raised by the CPU kernels, built out of line in a baseline translation unit: the
// ISA-specific kernel objects must not emit their own copies of std::string code (the linker
// would keep one copy for all variants, possibly an AVX-512 one).
#pragma once

#include <cstddef>

#include "memattn/tensor.h"

namespace memattn::cpu {

[[noreturn]] void throw_out_of_memory(std::size_t bytes);
[[noreturn]] void throw_unsupported_dtype(DType dtype);

}  // namespace memattn::cpu
