"""Test code that tests and benchmarks share, importable as ``fptq_onnx.testing.*``.

* :mod:`.cuda_sources`: the CUDA kernels' constants and variant table, read from ``custom_ops/``;
* :mod:`.cuda_emulation`, :mod:`.cuda_emulation_tma`: numpy emulations of the kernels' index
  math (mma.sync and TMA kernels, the quantize kernel, the pipeline protocols);
* :mod:`.cuda_library`: the standalone CUDA library through ctypes, and an emulated stand-in;
* :mod:`.cuda_correctness`: the GPU correctness suite (``tests/test_cuda_gpu.py`` runs it,
  ``benchmarks/gpu_gemm.py`` uses it to decide which variants it times);
* :mod:`.check_sass`: the machine-code checks of a built library (cuobjdump; tests/test_build_cuda.py,
  benchmarks/build_cuda_standalone.sh).

They read the CUDA sources of a checkout, so they work from a checkout only.
"""
