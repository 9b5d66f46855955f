// The engine's C++ shim: what tch has no API for.
//  - per-thread switch for the TorchScript graph executor's optimisation (it fuses ReLUs into
//    DifferentiableGraph nodes from the second call on, which would hide them from the hooks);
//  - guided backprop: post-hooks on every rectifier node of an autograd graph, clamping the
//    gradients they produce at zero;
//  - autocast to bfloat16 on CPU or CUDA (tch's own autocast is CUDA and float16 only);
//  - the channels-last memory format for a tensor;
//  - CUDA streams from libtorch's pool, set per thread (through c10's device-generic interface,
//    so the shim needs no CUDA headers and builds against CPU-only libtorch too);
//  - page-locked (pinned) host tensors for fast, asynchronous copies to and from the GPU;
//  - the cuDNN flags that a traced model froze into its convolution calls, set to the job's.
// Every function catches C++ exceptions and reports them through a message buffer.

#include <torch/torch.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <string>
#include <unordered_set>
#include <vector>

namespace {

// Bits of the `kinds` mask: which rectifier nodes are guided.
constexpr int KIND_RELU = 1;       // ReluBackward*, ThresholdBackward* (nn.ReLU, F.relu, relu_, F.threshold)
constexpr int KIND_HARDTANH = 2;   // HardtanhBackward* (ReLU6, F.relu6, hardtanh)
constexpr int KIND_LEAKY_RELU = 4; // LeakyReluBackward*

struct GuidedClampHook : torch::autograd::FunctionPostHook {
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& grad_inputs,
      const torch::autograd::variable_list& /*grad_outputs*/) override {
    torch::autograd::variable_list out;
    out.reserve(grad_inputs.size());
    for (const auto& g : grad_inputs) {
      out.push_back(g.defined() ? g.clamp_min(0) : g);
    }
    return out;
  }
};

bool starts_with(const std::string& s, const char* prefix) {
  return s.rfind(prefix, 0) == 0;
}

int kind_of(const std::string& name) {
  if (starts_with(name, "ReluBackward") || starts_with(name, "ThresholdBackward")) return KIND_RELU;
  if (starts_with(name, "HardtanhBackward")) return KIND_HARDTANH;
  if (starts_with(name, "LeakyReluBackward")) return KIND_LEAKY_RELU;
  return 0;
}

void set_error(char* buf, size_t len, const char* msg) {
  if (buf == nullptr || len == 0) return;
  std::strncpy(buf, msg, len - 1);
  buf[len - 1] = '\0';
}

// An exception's message without libtorch's C++ backtrace ("Exception raised from ... frame #0
// ..."), which c10::Error's what() appends: the message becomes a sample's error in the output.
const char* message(const std::exception& e) {
  if (auto c10 = dynamic_cast<const c10::Error*>(&e)) {
    return c10->what_without_backtrace();
  }
  return e.what();
}

// Autocast on CPU covers conv1d/2d/3d and the old `_convolution` overload, but not the full
// `aten::_convolution` that traced TorchScript models record for every convolution (CUDA's
// autocast covers both). This kernel casts it to the autocast dtype like the others, so fast
// mode runs convolutions in bfloat16 on CPU too. It only runs while CPU autocast is on.
at::Tensor convolution_autocast_cpu(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                                    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed,
                                    c10::SymIntArrayRef output_padding, c10::SymInt groups, bool benchmark,
                                    bool deterministic, bool cudnn_enabled, bool allow_tf32) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const auto dt = at::autocast::get_autocast_dtype(at::kCPU);
  const auto cpu = c10::DeviceType::CPU;
  return at::_convolution_symint(at::autocast::cached_cast(dt, input, cpu), at::autocast::cached_cast(dt, weight, cpu),
                                 at::autocast::cached_cast(dt, bias, cpu), stride, padding, dilation, transposed,
                                 output_padding, std::move(groups), benchmark, deterministic, cudnn_enabled,
                                 allow_tf32);
}

// The `aten::_convolution` calls in `block` and the blocks nested in it, each once.
void convolutions(torch::jit::Block* block, std::vector<torch::jit::Node*>& out) {
  static const auto kind = c10::Symbol::fromQualString("aten::_convolution");
  for (auto* node : block->nodes()) {
    for (auto* inner : node->blocks()) convolutions(inner, out);
    // 13 inputs: (…, groups, benchmark, deterministic, cudnn_enabled, allow_tf32); the old
    // overload's 12 lack allow_tf32.
    if (node->kind() == kind && node->inputs().size() >= 12) out.push_back(node);
  }
}

// Every `aten::_convolution` call in the methods of `module` and its submodules, each graph once
// (submodules of one type share their methods' graphs): in the methods' own graphs, or, with
// `optimized`, in their optimised graphs (each method's copy, made on its first call and kept,
// from which its graph executor's plans are copied; made now if there is none yet). Not in free
// functions a method calls (`prim::CallFunction`), which tracing does not make.
std::vector<std::pair<std::shared_ptr<torch::jit::Graph>, torch::jit::Node*>> module_convolutions(
    const torch::jit::Module& module, bool optimized = false) {
  std::vector<std::pair<std::shared_ptr<torch::jit::Graph>, torch::jit::Node*>> out;
  std::unordered_set<torch::jit::Graph*> seen;
  for (const auto& m : module.modules()) {
    for (const auto& method : m.get_methods()) {
      auto graph = optimized ? torch::jit::toGraphFunction(method.function()).optimized_graph() : method.graph();
      if (!seen.insert(graph.get()).second) continue;
      std::vector<torch::jit::Node*> nodes;
      convolutions(graph->block(), nodes);
      for (auto* n : nodes) out.emplace_back(graph, n);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, AutocastCPU, m) {
  m.impl("_convolution", TORCH_FN(convolution_autocast_cpu));
}

extern "C" {

// Turns the TorchScript graph executor's optimisation on or off for the calling thread.
void sa_set_graph_executor_optimize(int on) {
  torch::jit::setGraphExecutorOptimize(on != 0);
}

int sa_get_graph_executor_optimize() {
  return torch::jit::getGraphExecutorOptimize() ? 1 : 0;
}

// Walks the autograd graph from `root`'s grad_fn and adds a clamp-at-zero post-hook to every
// rectifier node selected by `kinds`. Returns the number of hooked nodes, or -1 on error
// (message in `err`). The hooks live as long as the graph: they go with it after a backward
// that does not keep the graph.
int sa_add_guided_hooks(const torch::Tensor* root, int kinds, char* err, size_t err_len) {
  try {
    if (root == nullptr || !root->defined()) {
      set_error(err, err_len, "guided hooks: root tensor is undefined");
      return -1;
    }
    auto fn = root->grad_fn();
    if (!fn) {
      set_error(err, err_len, "guided hooks: root tensor has no autograd graph");
      return -1;
    }
    std::vector<torch::autograd::Node*> stack{fn.get()};
    std::unordered_set<torch::autograd::Node*> seen;
    int hooked = 0;
    while (!stack.empty()) {
      torch::autograd::Node* node = stack.back();
      stack.pop_back();
      if (node == nullptr || !seen.insert(node).second) continue;
      if (kind_of(node->name()) & kinds) {
        node->add_post_hook(std::make_unique<GuidedClampHook>());
        ++hooked;
      }
      for (const auto& edge : node->next_edges()) {
        if (edge.function) stack.push_back(edge.function.get());
      }
    }
    return hooked;
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return -1;
  }
}

// Enters (enter != 0) or leaves bfloat16 autocast for the calling thread on CPU (cuda == 0) or
// CUDA. Entering records nothing: the caller leaves in the same thread, and leaving clears the
// cast cache when the outermost region ends, as torch.autocast does.
int sa_autocast_bf16(int cuda, int enter, char* err, size_t err_len) {
  try {
    const auto dev = cuda ? at::kCUDA : at::kCPU;
    if (enter) {
      at::autocast::set_autocast_dtype(dev, at::kBFloat16);
      at::autocast::set_autocast_enabled(dev, true);
      at::autocast::increment_nesting();
    } else {
      at::autocast::set_autocast_enabled(dev, false);
      if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    }
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return -1;
  }
}

// A new tensor: `t` in the channels-last memory format (a view's copy when needed), with
// autograd history. The caller owns it (tch frees it with at_free).
torch::Tensor* sa_channels_last(const torch::Tensor* t, char* err, size_t err_len) {
  try {
    return new torch::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return nullptr;
  }
}

// A stream of CUDA device `device` from libtorch's pool (created non-blocking: it does not wait
// for the legacy default stream). Writes its id to `id`.
int sa_cuda_pool_stream(int device, int64_t* id, char* err, size_t err_len) {
  try {
    const auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    *id = impl->getStreamFromGlobalPool(c10::Device(c10::DeviceType::CUDA, device), false).id();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return -1;
  }
}

// Makes stream `id` of CUDA device `device` the calling thread's current stream for that device
// (every later op of this thread on the device runs on it); writes the previous stream's id.
int sa_cuda_set_stream(int device, int64_t id, int64_t* previous, char* err, size_t err_len) {
  try {
    const auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Stream stream(c10::Stream::UNSAFE, c10::Device(c10::DeviceType::CUDA, device), id);
    *previous = impl->exchangeStream(stream).id();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return -1;
  }
}

// Waits until the calling thread's current stream on CUDA device `device` has finished its
// work (other streams, another worker's, go on).
int sa_cuda_sync_current_stream(int device, char* err, size_t err_len) {
  try {
    const auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    impl->synchronizeStream(impl->getStream(c10::Device(c10::DeviceType::CUDA, device)));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return -1;
  }
}

// Lets cuDNN use TF32 tensor cores for float32 convolutions (PyTorch's default) or not.
int sa_set_cudnn_tf32(int allow, char* err, size_t err_len) {
  try {
    at::globalContext().setAllowTF32CuDNN(allow != 0);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return -1;
  }
}

// A new contiguous uint8 host tensor of `numel` elements in page-locked memory (libtorch's
// caching host allocator, so repeated calls reuse blocks).
torch::Tensor* sa_empty_pinned_u8(int64_t numel, char* err, size_t err_len) {
  try {
    return new torch::Tensor(at::empty({numel}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return nullptr;
  }
}

// `t` (any device, any layout) copied into a new contiguous float32 host tensor of the same
// shape; page-locked when `pinned`. The copy runs on the current stream and is waited for.
torch::Tensor* sa_to_host_f32(const torch::Tensor* t, int pinned, char* err, size_t err_len) {
  try {
    auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU).pinned_memory(pinned != 0);
    auto host = at::empty(t->sizes(), opts);
    host.copy_(*t, /*non_blocking=*/false);
    return new torch::Tensor(std::move(host));
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return nullptr;
  }
}

// A traced model records each convolution as `aten::_convolution` with cuDNN's `benchmark` and
// `allow_tf32` flags as constants, frozen at export time; the op uses those, not the
// process-wide settings (which only its backward reads). `mode`:
//  - FLAGS_SET: sets them to `benchmark` and `allow_tf32` in every such call of `module` (a
//    torch::jit::Module, as torch-sys holds it), so the forward obeys the job's settings as the
//    backward does; call it before the first forward (the graph executor keeps its own copy of
//    the graph from then on). Returns the number of calls set.
//  - FLAGS_COUNT_STORED: the number of calls in the module's method graphs that have those
//    constant flags (a call of the old overload, without `allow_tf32`, counts if its
//    `benchmark` matches);
//  - FLAGS_COUNT_EXECUTED: the same count in the methods' optimised graphs, the copies that
//    their graph executors run (see `module_convolutions`; for the calling thread's autocast
//    state).
// -1 on error.
constexpr int FLAGS_COUNT_STORED = 0;
constexpr int FLAGS_SET = 1;
constexpr int FLAGS_COUNT_EXECUTED = 2;

int sa_convolution_flags(void* module, int benchmark, int allow_tf32, int mode, char* err, size_t err_len) {
  try {
    auto& m = *static_cast<torch::jit::Module*>(module);
    auto matches = [&](torch::jit::Node* node) {
      auto is = [&](size_t i, int v) { return torch::jit::constant_as<bool>(node->input(i)) == std::optional(v != 0); };
      return is(9, benchmark) && (node->inputs().size() < 13 || is(12, allow_tf32));
    };
    int n = 0;
    for (auto& [graph, node] : module_convolutions(m, mode == FLAGS_COUNT_EXECUTED)) {
      if (mode == FLAGS_SET) {
        torch::jit::WithInsertPoint at(node);
        node->replaceInput(9, graph->insertConstant(benchmark != 0));
        if (node->inputs().size() == 13) node->replaceInput(12, graph->insertConstant(allow_tf32 != 0));
        n++;
      } else if (matches(node)) {
        n++;
      }
    }
    return n;
  } catch (const std::exception& e) {
    set_error(err, err_len, message(e));
    return -1;
  }
}

}  // extern "C"
