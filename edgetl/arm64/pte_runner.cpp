// edgetl_pte_runner: runs an ExecuTorch .pte where the Python runtime cannot go.
//
// Why it exists: the executorch Python runtime needs torch, and aarch64 torch wheels are CUDA builds
// of several GB.  The executorch aarch64 wheel, though, ships standalone C++ libraries (runtime,
// XNNPACK delegate, optimized and quantized kernels, threadpool) that need only libc/libstdc++.
// edgetl cross-compiles this file against them at set-up; device_bench.py drives it (--runner) and
// does the statistics, so the timing protocol stays in one place.
//
// Usage: edgetl_pte_runner MODEL.pte            -> prints the input spec as JSON
//        edgetl_pte_runner MODEL.pte INPUTS.bin SAMPLES WARMUP ITERS THREADS MARKERS OUTPUTS.bin
//   INPUTS.bin holds SAMPLES raw input tensors (the model's input 0, in its dtype and shape);
//   the first is used for a first (timed) invoke, the warm-up and the timed invokes; every sample is
//   then run once and its output 0 written to OUTPUTS.bin as float32 (for top-1).  MARKERS=1 brackets each timed invoke
//   with the edgetl marker syscall, seen by the instruction-count plugin under qemu.
// Prints one JSON object on stdout; exits 2 with one line on stderr for a bad model or input.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <sys/auxv.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

// The wheel ships no header for the threadpool; these two declarations match its exported symbols.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::Error;

namespace {

#ifndef EDGETL_EXECUTORCH_VERSION
#define EDGETL_EXECUTORCH_VERSION "unknown"
#endif

constexpr long kMarkerSyscall = 0x0E7B;  // must match insn_count.c and device_bench.py
constexpr long kMarkerMagic = 0x6564676574L;

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "edgetl_pte_runner: %s\n", message.c_str());
  std::exit(2);
}

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    default: return "unsupported";
  }
}

double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

std::vector<float> as_float(const executorch::aten::Tensor& t) {
  std::vector<float> out(t.numel());
  for (ssize_t i = 0; i < t.numel(); ++i) {
    switch (t.scalar_type()) {
      case ScalarType::Float: out[i] = t.const_data_ptr<float>()[i]; break;
      case ScalarType::Char: out[i] = t.const_data_ptr<int8_t>()[i]; break;
      case ScalarType::Byte: out[i] = t.const_data_ptr<uint8_t>()[i]; break;
      default: fail(std::string("output dtype not supported: ") + dtype_name(t.scalar_type()));
    }
  }
  return out;
}

}  // namespace

// This process's own peak resident memory in kB: VmHWM from /proc/self/status. Not getrusage's ru_maxrss,
// which on Linux survives fork and exec (a runner started by a 3 GB parent would report 3 GB). Under
// qemu-user the file is the emulator's own. Falls back to ru_maxrss where there is no /proc.
static long peak_rss_kb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

int main(int argc, char** argv) {
  if (argc != 2 && argc != 9) {
    fail("usage: edgetl_pte_runner MODEL.pte [INPUTS.bin SAMPLES WARMUP ITERS THREADS MARKERS OUTPUTS.bin]");
  }
  const bool describe = argc == 2;
  const std::string model_path = argv[1];
  const std::string inputs_path = describe ? "" : argv[2];
  const long samples = describe ? 1 : std::atol(argv[3]);
  const long warmup = describe ? 0 : std::atol(argv[4]);
  const long iters = describe ? 1 : std::atol(argv[5]);
  const long threads = describe ? 1 : std::atol(argv[6]);
  const bool markers = describe ? false : std::atoi(argv[7]) != 0;
  const std::string outputs_path = describe ? "" : argv[8];
  if (samples < 1 || warmup < 0 || iters < 1 || threads < 1) {
    fail("SAMPLES, ITERS and THREADS must be >= 1 and WARMUP >= 0");
  }

  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool != nullptr) {
    pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
  }

  const double t_load = now_ms();
  Module module(model_path, Module::LoadMode::File);
  if (module.load() != Error::Ok) {
    fail("cannot load " + model_path + ": not a valid ExecuTorch program (.pte)");
  }
  if (module.load_forward() != Error::Ok) {
    fail("cannot load method 'forward' of " + model_path + " (missing kernels or backend?)");
  }
  const double load_ms = now_ms() - t_load;

  auto meta = module.method_meta("forward");
  if (!meta.ok() || meta->num_inputs() < 1) {
    fail(model_path + " has no tensor input");
  }
  auto in_meta = meta->input_tensor_meta(0);
  if (!in_meta.ok()) {
    fail(model_path + ": input 0 is not a tensor");
  }
  const ScalarType in_type = in_meta->scalar_type();
  const size_t in_bytes = in_meta->nbytes();
  std::vector<executorch::aten::SizesType> sizes(in_meta->sizes().begin(), in_meta->sizes().end());
  if (describe) {
    std::printf("{\"runner\": \"edgetl_pte_runner\", \"version\": 1, \"executorch_version\": \"%s\", ",
                EDGETL_EXECUTORCH_VERSION);
    std::printf("\"input\": {\"dtype\": \"%s\", \"shape\": [", dtype_name(in_type));
    for (size_t i = 0; i < sizes.size(); ++i) std::printf("%s%d", i ? ", " : "", static_cast<int>(sizes[i]));
    std::printf("]}}\n");
    return 0;
  }

  std::ifstream in_file(inputs_path, std::ios::binary | std::ios::ate);
  if (!in_file) {
    fail("cannot read inputs " + inputs_path);
  }
  const auto in_file_size = static_cast<size_t>(in_file.tellg());
  if (in_file_size != in_bytes * static_cast<size_t>(samples)) {
    fail("inputs " + inputs_path + " hold " + std::to_string(in_file_size) + " bytes; the model's input (" +
         dtype_name(in_type) + ", " + std::to_string(in_bytes) + " bytes) times " + std::to_string(samples) +
         " samples needs " + std::to_string(in_bytes * samples));
  }
  std::vector<uint8_t> inputs(in_file_size);
  in_file.seekg(0);
  in_file.read(reinterpret_cast<char*>(inputs.data()), static_cast<std::streamsize>(in_file_size));

  auto run = [&](size_t sample) {
    auto tensor = from_blob(inputs.data() + sample * in_bytes, sizes, in_type);
    auto result = module.forward(tensor);
    if (!result.ok() || result->empty() || !(*result)[0].isTensor()) {
      fail("forward failed on " + model_path);
    }
    return (*result)[0].toTensor();
  };

  const double t_first = now_ms();
  run(0);
  const double first_ms = now_ms() - t_first;
  for (long i = 0; i < warmup; ++i) {
    run(0);
  }
  std::vector<double> times;
  times.reserve(iters);
  for (long i = 0; i < iters; ++i) {
    const double t0 = now_ms();
    if (markers) syscall(kMarkerSyscall, kMarkerMagic, 1L);
    run(0);
    if (markers) syscall(kMarkerSyscall, kMarkerMagic, 2L);
    times.push_back(now_ms() - t0);
  }
  if (markers) {  // brackets around nothing: their count is the bracket's own overhead
    for (int i = 0; i < 5; ++i) {
      syscall(kMarkerSyscall, kMarkerMagic, 1L);
      syscall(kMarkerSyscall, kMarkerMagic, 2L);
    }
  }

  std::ofstream out_file(outputs_path, std::ios::binary | std::ios::trunc);
  std::string out_dtype = "float32";
  std::vector<long> out_shape;
  for (long s = 0; s < samples; ++s) {
    auto out = run(static_cast<size_t>(s));
    if (s == 0) {
      out_dtype = dtype_name(out.scalar_type());
      for (auto d : out.sizes()) out_shape.push_back(d);
    }
    auto values = as_float(out);
    out_file.write(reinterpret_cast<const char*>(values.data()),
                   static_cast<std::streamsize>(values.size() * sizeof(float)));
  }
  out_file.close();

  const long peak_kb = peak_rss_kb();
  std::printf("{\"runner\": \"edgetl_pte_runner\", \"version\": 1, \"executorch_version\": \"%s\", ",
              EDGETL_EXECUTORCH_VERSION);
  std::printf("\"load_ms\": %.6f, \"first_invoke_ms\": %.6f, \"threads\": %ld, ", load_ms, first_ms, threads);
  std::printf("\"input\": {\"dtype\": \"%s\", \"shape\": [", dtype_name(in_type));
  for (size_t i = 0; i < sizes.size(); ++i) std::printf("%s%d", i ? ", " : "", static_cast<int>(sizes[i]));
  std::printf("]}, \"output\": {\"dtype\": \"%s\", \"shape\": [", out_dtype.c_str());
  for (size_t i = 0; i < out_shape.size(); ++i) std::printf("%s%ld", i ? ", " : "", out_shape[i]);
  std::printf("]}, \"hwcap\": %lu, \"hwcap2\": %lu, \"max_rss_kb\": %ld, \"times_ms\": [",
              getauxval(AT_HWCAP), getauxval(AT_HWCAP2), peak_kb);
  for (size_t i = 0; i < times.size(); ++i) std::printf("%s%.6f", i ? ", " : "", times[i]);
  std::printf("]}\n");
  return 0;
}
