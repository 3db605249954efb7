// Programmatic dependent launch (Hopper and later), shared by the decode-step kernels.
//
// A kernel launched with launch_kernel(..., programmatic = true) may start while the kernel before
// it in the stream finishes. Until wait_for_previous_kernel() it may read only what no kernel of
// the step writes (weights); the wait returns once the previous kernel has completed and its
// writes are visible. Since every kernel launched this way waits before it ends, each kernel's
// predecessors have all completed by then. allow_next_kernel() lets the next kernel start early.
// On older GPUs (and without the flag) kernels run one after the other as usual.
#pragma once
#include <cuda_runtime.h>

namespace vpit::cuda {

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, bool programmatic,
                          void (*kernel)(KernelArgs...), Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...);
}

}  // namespace vpit::cuda
