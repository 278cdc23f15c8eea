#include "cpu/errors.h"

#include <string>

#include "memattn/error.h"

namespace memattn::cpu {

void throw_out_of_memory(std::size_t bytes) {
  throw Error(ErrorKind::runtime, "memattn cpu: out of host memory allocating " +
                                      std::to_string(bytes) + " bytes of scratch");
}

void throw_unsupported_dtype(DType dtype) {
  throw Error(ErrorKind::not_implemented, std::string("memattn cpu: no kernel for dtype ") +
                                              dtype_name(dtype) + " (float32, float64, bfloat16)");
}

}  // namespace memattn::cpu
