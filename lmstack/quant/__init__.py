"""Quantization: formats (NF4/FP4, int8/int4/int3 groups), methods (RTN, GPTQ, AWQ, SmoothQuant, QAT) and
the quantized linear modules swapped in by name for the model's `Linear` leaves."""
