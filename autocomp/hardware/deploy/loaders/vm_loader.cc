// Runs an exported TVM Relax VM library outside Python, as a deployment would.
//
//   vm_loader MODULE.so INPUT.bin OUTPUT.bin COUNT DIM...
//
// INPUT.bin holds COUNT float32 inputs of shape DIM... back to back. For each input
// the loader calls the module's "main" on the CPU and appends the raw bytes of every
// output tensor to OUTPUT.bin. For the first input it prints one line per output,
// "output DTYPE D0xD1x...", so the caller can read OUTPUT.bin back. Built by autocomp
// (autocomp/hardware/qemu.py) against libtvm_runtime.so and the tvm-ffi headers.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// TVM's kernels assume tensor data aligned as its own allocator aligns it (vector loads).
constexpr size_t kAlignment = 64;

struct CpuAlloc {
  void AllocData(DLTensor* tensor) {
    const size_t bytes = (ffi::GetDataSize(*tensor) + kAlignment - 1) / kAlignment * kAlignment;
    tensor->data = std::aligned_alloc(kAlignment, bytes ? bytes : kAlignment);
    if (tensor->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

void Collect(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto items = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *items) Collect(item, out);
  } else {
    throw std::runtime_error("main returned something other than tensors: " + value.GetTypeKey());
  }
}

int Run(int argc, char** argv) {
  if (argc < 6) {
    std::cerr << "usage: vm_loader MODULE.so INPUT.bin OUTPUT.bin COUNT DIM...\n";
    return 2;
  }
  const long count = std::atol(argv[4]);
  std::vector<int64_t> shape;
  for (int i = 5; i < argc; ++i) shape.push_back(std::atoll(argv[i]));
  DLDataType f32{kDLFloat, 32, 1};
  DLDevice cpu{kDLCPU, 0};

  ffi::Module library = ffi::Module::LoadFromFile(argv[1]);
  ffi::Optional<ffi::Function> load = library->GetFunction("vm_load_executable", true);
  if (!load.has_value()) throw std::runtime_error("not a Relax VM library: no vm_load_executable");
  ffi::Module vm = (*load)().cast<ffi::Module>();
  const int pooled_allocator = 2;
  (*vm->GetFunction("vm_initialization", false))(static_cast<int>(kDLCPU), 0, pooled_allocator);
  ffi::Function main_fn = *vm->GetFunction("main", false);

  std::ifstream in(argv[2], std::ios::binary);
  std::ofstream out(argv[3], std::ios::binary);
  if (!in || !out) throw std::runtime_error("cannot open the input or output file");
  for (long n = 0; n < count; ++n) {
    ffi::Tensor input = ffi::Tensor::FromNDAlloc(CpuAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                                 f32, cpu);
    const size_t bytes = ffi::GetDataSize(input);
    if (!in.read(static_cast<char*>(input.data_ptr()), static_cast<std::streamsize>(bytes))) {
      throw std::runtime_error("input file is shorter than COUNT inputs of the given shape");
    }
    std::vector<ffi::Tensor> outputs;
    Collect(main_fn(input), &outputs);
    for (const ffi::Tensor& tensor : outputs) {
      if (n == 0) {
        std::cout << "output " << ffi::DLDataTypeToString(tensor.dtype()) << " ";
        for (size_t d = 0; d < tensor.shape().size(); ++d) {
          std::cout << (d ? "x" : "") << tensor.shape()[d];
        }
        std::cout << "\n";
      }
      out.write(static_cast<const char*>(tensor.data_ptr()),
                static_cast<std::streamsize>(ffi::GetDataSize(tensor)));
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& err) {
    std::cerr << "vm_loader: " << err.what() << "\n";
    return 1;
  }
}
