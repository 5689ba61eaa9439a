"""Weight formats, pure quantize/dequantize and packing, int4 kernel layouts, CPU and CUDA kernels."""
