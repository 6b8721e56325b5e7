"""Correctness probes that need the hardware to mean something (compiled kernels, CUDA graphs, GPU runs), which
benchmarks/gpu_check.sh runs beside the timings of benchmarks/; each exits 1 where what it checks does not hold."""
